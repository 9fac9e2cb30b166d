"""`detect`: the gate as a zero-shot classifier over prompts (docs/method.md), and `calibrate`:
pick the concept latent and its firing threshold on reference prompts (docs/identification.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from snce_fast.ops import backend, reference
from snce_fast.checks import Neurons, as_neuron_list, positive_int, unique_neurons
from snce_fast.hooks.activations import counted_mask, eos_id, hook_activations, tokenize
from snce_fast.hooks.patching import text_encoders
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
) -> Detection:
    """Flag prompts on which a target latent fires (value > threshold) on >= min_tokens counted tokens.

    For an SDXL pipeline with one SAE per encoder, a prompt is flagged if any encoder flags it.
    `max_length` pads/truncates prompts to that many tokens (default: the tokenizer's limit, as the
    pipelines do); counted tokens never include padding, so a shorter pad changes only speed.
    `penultimate_output=True` reads a bare encoder as SDXL does (hidden_states[-2] for hook "output").
    """
    positive_int(min_tokens, "min_tokens")
    positive_int(batch_size, "batch_size")
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
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            batch = tokenize(tok, chunk, max_length)
            hidden = hook_activations(enc, batch, s.hook, penultimate)
            values, indices = backend.encode(hidden, s)
            z_all = reference.target_activations(values, indices, targets)  # [B, L, T]
            z_t = z_all.amax(-1)  # [B, L]
            counted = counted_mask(batch["input_ids"], batch.get("attention_mask"), eos_id(enc, tok)).to(z_t.device)
            fired = ((z_all > thr.to(z_all.device)).any(-1) & counted).sum(-1).cpu()
            best = torch.where(counted, z_t, torch.zeros_like(z_t)).amax(-1).float().cpu()
            sl = slice(start, start + len(chunk))
            flags[sl] |= fired >= min_tokens
            scores[sl] = torch.maximum(scores[sl], best)
            tokens[sl] = torch.maximum(tokens[sl], fired)
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
) -> torch.Tensor:
    """float32 [P, T]: per prompt and neuron (in the order given), the `min_tokens`-th largest
    activation over counted tokens (0 where it fires on fewer). The gate with threshold t and
    `min_tokens` flags prompt p for neuron j exactly when this value is > t. `max_length` as in
    `detect` (pad / truncate to that many tokens; default the tokenizer's limit)."""
    positive_int(min_tokens, "min_tokens")
    positive_int(batch_size, "batch_size")
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
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = tokenize(tok, chunk, max_length)
        hidden = hook_activations(enc, batch, sae.hook, penultimate)
        values, indices = backend.encode(hidden, sae)
        values, indices = values.float().cpu(), indices.long().cpu()
        counted = counted_mask(batch["input_ids"], batch.get("attention_mask"), eos_id(enc, tok)).cpu()
        B, L, _ = indices.shape
        if min_tokens > L:
            continue  # no prompt has that many tokens: all zero
        cols = column[indices]  # [B, L, k], -1 where the latent is not a requested neuron
        hit = (cols >= 0) & counted.unsqueeze(-1)
        # dense [b, L, C] in sub-batches that keep it under ~2^25 floats
        step = max(1, (1 << 25) // max(L * len(order), 1))
        for s in range(0, B, step):
            h = hit[s : s + step]
            b, l, slot = h.nonzero(as_tuple=True)
            z = torch.zeros(h.shape[0], L, len(order))
            z[b, l, cols[s : s + step][b, l, slot]] = values[s : s + step][b, l, slot].clamp_min(0.0)
            out[start + s : start + s + h.shape[0]] = z.topk(min_tokens, dim=1).values[:, min_tokens - 1]
    return out


# calibration rates measured best in experiments/ablate_identification.py: generic captions, then
# style-matched references (held-out FPRs then stay under 2% COCO / 10% hard negatives)
DEFAULT_FPR = 0.01
DEFAULT_MATCHED_FPR = 0.05


@dataclass
class Calibration:
    """Candidates re-ranked by calibrated recall. `neurons` best first; `thresholds[i]` the firing
    threshold of `neurons[i]` (flags <= `fpr` of every reference group's prompts); `recall[i]` its
    share of target prompts flagged; `reference_rates[g][i]` its share of group g flagged."""

    neurons: list[int]
    thresholds: torch.Tensor
    recall: torch.Tensor
    reference_rates: dict[str, torch.Tensor]
    fpr: dict[str, float]  # the calibration rate of each reference group
    min_tokens: int
    target_activations: torch.Tensor = field(repr=False)  # [P_target, C], columns as `neurons`
    reference_activations: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def top(self, n: int = 1, greedy: bool = True) -> list[int]:
        """The n best latents. `greedy` (default): add latents one at a time by the most new target
        prompts flagged net of the largest new reference share (stops early when nothing adds);
        otherwise the n best by individual score."""
        positive_int(n, "n")
        if not greedy or n == 1:
            return self.neurons[:n]
        thr = self.thresholds
        T = self.target_activations > thr
        R = [a > thr for a in self.reference_activations.values()]
        cov_t = torch.zeros(T.shape[0], dtype=torch.bool)
        cov_r = [torch.zeros(x.shape[0], dtype=torch.bool) for x in R]

        def objective(t: torch.Tensor, rs: list[torch.Tensor]) -> torch.Tensor:
            # union recall minus the largest union reference rate (per column when 2-D)
            worst = torch.stack([r.float().mean(0) for r in rs]).amax(0) if rs else 0.0
            return t.float().mean(0) - worst

        chosen: list[int] = []
        current = float(objective(cov_t, cov_r))
        for _ in range(min(n, len(self.neurons))):
            gain = objective(T | cov_t[:, None], [x | c[:, None] for x, c in zip(R, cov_r)])
            gain[chosen] = -math.inf
            i = int(torch.argmax(gain))
            if chosen and float(gain[i]) <= current:
                break  # no further latent adds recall net of false positives
            chosen.append(i)
            cov_t |= T[:, i]
            cov_r = [c | x[:, i] for c, x in zip(cov_r, R)]
            current = float(gain[i])
        return [self.neurons[i] for i in chosen]

    def thresholds_for(self, neurons: Neurons) -> list[float]:
        """Calibrated thresholds of `neurons` (in that order), for `detect(threshold=...)`."""
        order = [neurons] if isinstance(neurons, int) else [int(j) for j in neurons]
        pos = {j: i for i, j in enumerate(self.neurons)}
        missing = [j for j in order if j not in pos]
        if missing:
            raise ValueError(f"neuron {missing[0]} was not calibrated: expected one of the candidates {self.neurons}")
        return [float(self.thresholds[pos[j]]) for j in order]

    def threshold(self, neurons: Neurons) -> float:
        """One threshold for a neuron set (the gate and `patch` take one float): the largest of
        their calibrated thresholds, so each flags <= `fpr` of the references on its own."""
        return max(self.thresholds_for(neurons))


def calibrate(
    pipe_or_encoder: Any,
    sae: SAE,
    candidates: Optional[Neurons],
    target_prompts: Sequence[str],
    reference_prompts: Union[Sequence[str], dict[str, Sequence[str]]],
    fpr: Union[float, dict[str, float], None] = None,
    min_tokens: int = 1,
    tokenizer: Any = None,
    batch_size: int = 64,
    max_length: Optional[int] = None,
    penultimate_output: bool = False,
) -> Calibration:
    """Calibrate each candidate's firing threshold so it flags at most `fpr` of every reference
    group, then rank candidates by target recall minus the largest reference rate at that threshold.

    `candidates`: None (every latent; memory ~4 bytes x prompts x n_latents) or e.g.
    `score(stats, ...).top(1024)` (a short list can miss the best latent: see the docs);
    `reference_prompts`: a list or several named
    groups (COCO-like captions and style-matched ordinary prompts: the strongest wins); `fpr`: one
    rate for every group or one per group name (e.g. {"coco": 0.01, "matched": 0.05}); None (default,
    the measured best, docs/identification.md): 0.01 for the first group (generic captions) and
    0.05 for every further group (style-matched ordinary prompts). Use prompts
    not used for the scan where possible. `calibration.top(1)` and `calibration.threshold(...)`
    then go to `detect(..., threshold=)` / `patch(..., gate=True, threshold=)`.
    """
    from snce_fast.workflow.score import threshold_at_fpr

    refs = {"reference": list(reference_prompts)} if not isinstance(reference_prompts, dict) else {
        g: list(p) for g, p in reference_prompts.items()}
    if not refs or any(len(p) == 0 for p in refs.values()):
        raise ValueError("reference_prompts is empty: calibration needs reference prompts in every group")
    if len(target_prompts) == 0:
        raise ValueError("target_prompts is empty: calibration needs concept prompts to measure recall")
    if fpr is None:
        rates_in = {g: (DEFAULT_FPR if i == 0 else DEFAULT_MATCHED_FPR) for i, g in enumerate(refs)}
    else:
        rates_in = dict(fpr) if isinstance(fpr, dict) else {g: fpr for g in refs}
    if set(rates_in) != set(refs):
        raise ValueError(f"fpr names groups {sorted(rates_in)}: expected one rate per reference group {sorted(refs)}")
    if candidates is None:
        candidates = list(range(sae.n_latents))
    order = unique_neurons(candidates, sae.n_latents)

    def acts(ps: Sequence[str]) -> torch.Tensor:
        return prompt_activations(pipe_or_encoder, sae, order, ps, tokenizer, min_tokens, batch_size, max_length,
                                  penultimate_output)

    ref_acts = {g: acts(p) for g, p in refs.items()}
    thr = torch.stack([threshold_at_fpr(a, rates_in[g]) for g, a in ref_acts.items()]).amax(0)
    tgt = acts(target_prompts)
    recall = (tgt > thr).float().mean(0)
    rates = {g: (a > thr).float().mean(0) for g, a in ref_acts.items()}
    score = recall - torch.stack(list(rates.values())).amax(0)
    rank = torch.sort(score, descending=True, stable=True).indices.tolist()
    return Calibration(
        neurons=[order[i] for i in rank], thresholds=thr[rank], recall=recall[rank],
        reference_rates={g: r[rank] for g, r in rates.items()}, fpr=rates_in, min_tokens=min_tokens,
        target_activations=tgt[:, rank], reference_activations={g: a[:, rank] for g, a in ref_acts.items()},
    )


def _tokenizer_for(target: Any, encoder_name: str) -> Any:
    attr = "tokenizer_2" if encoder_name == "text_encoder_2" else "tokenizer"
    tok = getattr(target, attr, None)
    if tok is None:
        raise ValueError("a bare text encoder needs its tokenizer: detect(encoder, sae, neurons, prompts, tokenizer=tok)")
    return tok
