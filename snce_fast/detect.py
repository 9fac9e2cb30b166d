"""`detect`: the gate as a zero-shot classifier over prompts (SPEC section 2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from . import backend, reference
from ._validate import Neurons, as_neuron_list, positive_int
from .activations import counted_mask, eos_id, hook_activations, tokenize
from .patching import text_encoders
from .sae import SAE


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
) -> Detection:
    """Flag prompts on which a target latent fires (value > threshold) on >= min_tokens counted tokens.

    For an SDXL pipeline with one SAE per encoder, a prompt is flagged if any encoder flags it.
    `max_length` pads/truncates prompts to that many tokens (default: the tokenizer's limit, as the
    pipelines do); counted tokens never include padding, so a shorter pad changes only speed.
    """
    positive_int(min_tokens, "min_tokens")
    positive_int(batch_size, "batch_size")
    if isinstance(prompts, str):
        prompts = [prompts]
    encoders = text_encoders(pipe_or_encoder)
    saes = sae if isinstance(sae, dict) else {name: sae for name in encoders}
    flags = torch.zeros(len(prompts), dtype=torch.bool)
    scores = torch.zeros(len(prompts), dtype=torch.float32)
    tokens = torch.zeros(len(prompts), dtype=torch.int64)
    for name, s in saes.items():
        if name not in encoders:
            raise ValueError(f"sae names encoder {name!r}: expected one of {list(encoders)}")
        enc, penultimate = encoders[name]
        tok = tokenizer or _tokenizer_for(pipe_or_encoder, name)
        targets = as_neuron_list(neurons[name] if isinstance(neurons, dict) else neurons, s.n_latents)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            batch = tokenize(tok, chunk, max_length)
            hidden = hook_activations(enc, batch, s.hook, penultimate)
            values, indices = backend.encode(hidden, s)
            z_t = reference.target_activations(values, indices, targets).amax(-1)  # [B, L]
            counted = counted_mask(batch["input_ids"], batch.get("attention_mask"), eos_id(enc, tok)).to(z_t.device)
            fired = ((z_t > threshold) & counted).sum(-1).cpu()
            best = torch.where(counted, z_t, torch.zeros_like(z_t)).amax(-1).float().cpu()
            sl = slice(start, start + len(chunk))
            flags[sl] |= fired >= min_tokens
            scores[sl] = torch.maximum(scores[sl], best)
            tokens[sl] = torch.maximum(tokens[sl], fired)
    return Detection(flags=flags, scores=scores, tokens=tokens)


def _tokenizer_for(target: Any, encoder_name: str) -> Any:
    attr = "tokenizer_2" if encoder_name == "text_encoder_2" else "tokenizer"
    tok = getattr(target, attr, None)
    if tok is None:
        raise ValueError("a bare text encoder needs its tokenizer: detect(encoder, sae, neurons, prompts, tokenizer=tok)")
    return tok
