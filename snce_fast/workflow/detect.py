"""`detect`: the gate as a zero-shot classifier over prompts (docs/method.md), and
`prompt_activations`, the per-prompt scores it thresholds (also what `calibrate` measures)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from snce_fast.checks import Neurons, as_neuron_list, positive_int, unique_neurons
from snce_fast.hooks.activations import eos_id, hook_activations
from snce_fast.hooks.batching import TOKEN_BUDGET, check_batching, corpus_batches
from snce_fast.hooks.patching import text_encoders
from snce_fast.ops import backend, reference
from snce_fast.sae.model import SAE


@dataclass
class Detection:
    """Per-prompt results: `flags` bool [P] (the gate's decision), `scores` float [P]
    (max target activation over counted tokens), `tokens` int [P] (counted tokens that fired)."""

    flags: torch.Tensor
    scores: torch.Tensor
    tokens: torch.Tensor

    def __len__(self) -> int:
        return int(self.flags.numel())


@torch.no_grad()
def detect(
    pipe_or_encoder: Any,
    sae: Union[SAE, dict[str, SAE]],
    neurons: Union[Neurons, dict[str, Neurons]],
    prompts: Sequence[str],
    tokenizer: Any = None,
    min_tokens: int = 1,
    threshold: float = 0.0,
    batch_size: int = 64,
    max_length: Optional[int] = None,
    penultimate_output: bool = False,
    token_budget: int = TOKEN_BUDGET,
    progress: bool = False,
) -> Detection:
    """Flag prompts on which a target latent fires (value > threshold) on >= min_tokens counted tokens.

    For an SDXL pipeline with one SAE per encoder, a prompt is flagged if any encoder flags it.
    `max_length` pads/truncates prompts to that many tokens (default: the tokenizer's limit, as the
    pipelines do); counted tokens never include padding, so a shorter pad changes only speed.
    `penultimate_output=True` reads a bare encoder as SDXL does (hidden_states[-2] for hook "output").
    Prompts are encoded sorted by length, in calls of at most `batch_size` prompts and `token_budget`
    padded tokens; results are in input order. `progress`: a bar with prompts/s.
    """
    positive_int(min_tokens, "min_tokens")
    check_batching(batch_size, token_budget)
    if isinstance(prompts, str):
        prompts = [prompts]
    encoders = text_encoders(pipe_or_encoder, penultimate_output)
    saes = sae if isinstance(sae, dict) else {name: sae for name in encoders}
    flags = torch.zeros(len(prompts), dtype=torch.bool)
    scores = torch.zeros(len(prompts), dtype=torch.float32)
    tokens = torch.zeros(len(prompts), dtype=torch.int64)
    for name, s in saes.items():
        if name not in encoders:
            raise ValueError(f"sae names encoder {name!r}: expected one of {list(encoders)}")
        enc, penultimate = encoders[name]
        tok = tokenizer or _tokenizer_for(pipe_or_encoder, name)
        given = neurons[name] if isinstance(neurons, dict) else neurons
        targets = as_neuron_list(given, s.n_latents)
        thr = _per_target_threshold(threshold, given, targets, len(saes))
        bar = f"detect ({name})" if progress and len(saes) > 1 else ("detect" if progress else None)
        with corpus_batches(tok, list(prompts), max_length, eos_id(enc, tok), batch_size, token_budget,
                            progress=bar) as batches:
            for tb in batches:
                hidden = hook_activations(enc, tb.tokens, s.hook, penultimate)
                values, indices = backend.encode(hidden, s)
                z_all = reference.target_activations(values, indices, targets)  # [B, L, T]
                z_t = z_all.amax(-1)  # [B, L]
                counted = tb.counted.to(z_t.device)
                fired = ((z_all > thr.to(z_all.device)).any(-1) & counted).sum(-1).cpu()
                best = torch.where(counted, z_t, torch.zeros_like(z_t)).amax(-1).float().cpu()
                at = tb.index
                flags[at] |= fired >= min_tokens
                scores[at] = torch.maximum(scores[at], best)
                tokens[at] = torch.maximum(tokens[at], fired)
    return Detection(flags=flags, scores=scores, tokens=tokens)


def _per_target_threshold(threshold: Any, given: Any, targets: list[int], n_saes: int) -> torch.Tensor:
    """`threshold` as a float32 tensor aligned with the sorted target list: [] (one for all) or [T]."""
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)) and n_saes != 1:
        raise ValueError("per-neuron thresholds need a single SAE: pass one float for an SDXL pipeline")
    return torch.as_tensor(reference.target_thresholds(threshold, given, targets), dtype=torch.float32)


@torch.no_grad()
def prompt_activations(
    pipe_or_encoder: Any,
    sae: SAE,
    neurons: Neurons,
    prompts: Sequence[str],
    tokenizer: Any = None,
    min_tokens: int = 1,
    batch_size: int = 64,
    max_length: Optional[int] = None,
    penultimate_output: bool = False,
    token_budget: int = TOKEN_BUDGET,
    progress: Optional[str] = None,
) -> torch.Tensor:
    """float32 [P, T]: per prompt and neuron (in the order given), the `min_tokens`-th largest
    activation over counted tokens (0 where it fires on fewer). The gate with threshold t and
    `min_tokens` flags prompt p for neuron j exactly when this value is > t. `max_length` as in
    `detect` (pad / truncate to that many tokens; default the tokenizer's limit), and so are
    `batch_size` and `token_budget`; `progress`: a progress bar with that description."""
    positive_int(min_tokens, "min_tokens")
    check_batching(batch_size, token_budget)
    if isinstance(sae, dict):
        raise ValueError("prompt_activations takes one SAE: call it once per text encoder")
    if isinstance(prompts, str):
        prompts = [prompts]
    order = unique_neurons(neurons, sae.n_latents)
    encoders = text_encoders(pipe_or_encoder, penultimate_output)
    name = next(iter(encoders))
    enc, penultimate = encoders[name]
    tok = tokenizer or _tokenizer_for(pipe_or_encoder, name)
    out = torch.zeros(len(prompts), len(order), dtype=torch.float32)
    column = torch.full((sae.n_latents,), -1, dtype=torch.long)
    column[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    with corpus_batches(tok, list(prompts), max_length, eos_id(enc, tok), batch_size, token_budget,
                        progress=progress) as batches:
        for tb in batches:
            hidden = hook_activations(enc, tb.tokens, sae.hook, penultimate)
            values, indices = backend.encode(hidden, sae)
            out[tb.index] = _kth_largest(values.float().cpu(), indices.long().cpu(), tb.counted, column, len(order),
                                         min_tokens)
    return out


def _kth_largest(values: torch.Tensor, indices: torch.Tensor, counted: torch.Tensor, column: torch.Tensor,
                 n_cols: int, kth: int) -> torch.Tensor:
    """[B, n_cols]: per prompt and requested latent, the `kth` largest activation over counted tokens (0
    where it fires on fewer). `column` maps a latent to its output column (-1: not requested)."""
    B, L, _ = indices.shape
    out = torch.zeros(B, n_cols)
    if kth > L:
        return out  # no prompt has that many tokens: all zero
    cols = column[indices]  # [B, L, k], -1 where the latent is not a requested neuron
    hit = (cols >= 0) & counted.unsqueeze(-1)
    # dense [b, L, C] in sub-batches that keep it under ~2^25 floats
    step = max(1, (1 << 25) // max(L * n_cols, 1))
    for s in range(0, B, step):
        h = hit[s : s + step]
        b, l, slot = h.nonzero(as_tuple=True)
        z = torch.zeros(h.shape[0], L, n_cols)
        z[b, l, cols[s : s + step][b, l, slot]] = values[s : s + step][b, l, slot].clamp_min(0.0)
        out[s : s + h.shape[0]] = z.topk(kth, dim=1).values[:, kth - 1]
    return out


def _tokenizer_for(target: Any, encoder_name: str) -> Any:
    attr = "tokenizer_2" if encoder_name == "text_encoder_2" else "tokenizer"
    tok = getattr(target, attr, None)
    if tok is None:
        raise ValueError("a bare text encoder needs its tokenizer: detect(encoder, sae, neurons, prompts, tokenizer=tok)")
    return tok
