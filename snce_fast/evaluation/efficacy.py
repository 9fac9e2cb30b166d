"""Does the edit erase? Concept removal measured at the embedding level (docs/efficacy.md).

    embed_tokens      prompts -> token embeddings at the encoder output (computed once, shared by edits)
    PromptSets        the reader's training prompts, the measured (held-out) prompts, concept/neutral pairs
    snce_edit / calibrated_edit / leace_edit / no_edit    the edits compared
    measure_erasure   per edit: fixed-reader survival, retrained-reader AUC, collateral, pair cosines

The SNCE edits run the op the patch hook runs (`_PatchState` + `backend.edit`, BOS never edited,
the gate counting tokens 1..EOS) on the encoder output, so an SAE at hook "output" is measured
exactly as `snce_fast.patch` applies it. LEACE uses EleutherAI's `concept-erasure` (extra `efficacy`).
"""
from __future__ import annotations

import importlib.util
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from snce_fast.checks import as_neuron_list, check_edit_args, check_fpr, positive_int
from snce_fast.evaluation.probes import LinearProbe, auc, fit_probe, mean_pool
from snce_fast.hooks.activations import eos_id, hook_activations
from snce_fast.hooks.batching import TOKEN_BUDGET, check_batching, corpus_batches
from snce_fast.hooks.compat import check_sae_fits
from snce_fast.hooks.patching import _PatchState, text_encoders
from snce_fast.ops import backend, reference

LEACE_HINT = "LEACE needs EleutherAI's concept-erasure: pip install 'snce_fast[efficacy]' (or concept-erasure)"
Embeddings = dict  # prompt -> float32 [n, d]: the encoder output at positions 0..EOS (row 0 = BOS)


# ------------------------------------------------------------------------------------------- prompts
@dataclass
class PromptSets:
    """`concept_train` / `ordinary_train` fit the readers (and LEACE); the `*_test` sets are measured.
    `matched_test`: ordinary prompts in the concept's style (optional); `pairs`: (concept, neutral)."""

    concept_train: Sequence[str]
    ordinary_train: Sequence[str]
    concept_test: Sequence[str]
    generic_test: Sequence[str]
    matched_test: Sequence[str] = ()
    pairs: Sequence[tuple[str, str]] = ()

    def check(self) -> None:
        for name in ("concept_train", "ordinary_train", "concept_test", "generic_test"):
            ps = getattr(self, name)
            if isinstance(ps, str) or len(ps) == 0:
                raise ValueError(f"PromptSets.{name} is empty: expected a list of at least one prompt")
        for i, pair in enumerate(self.pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)):
                raise ValueError(f"PromptSets.pairs[{i}] is {pair!r}: expected (concept prompt, neutral prompt)")

    def all_prompts(self) -> list[str]:
        out = [*self.concept_train, *self.ordinary_train, *self.concept_test, *self.generic_test, *self.matched_test]
        for c, n in self.pairs:
            out += [c, n]
        return list(dict.fromkeys(out))


def _single_encoder(pipe_or_encoder: Any, tokenizer: Any, penultimate_output: bool) -> tuple[Any, Any, bool]:
    encoders = text_encoders(pipe_or_encoder, penultimate_output)
    if len(encoders) != 1:
        raise ValueError(f"measure_erasure reads one text encoder; this pipeline has {list(encoders)}: "
                         "pass the one to measure (e.g. pipe.text_encoder_2) with its tokenizer")
    (name, (enc, penultimate)), = encoders.items()
    tok = tokenizer or getattr(pipe_or_encoder, "tokenizer", None)
    if tok is None:
        raise ValueError("no tokenizer: pass tokenizer= for a bare encoder")
    return enc, tok, penultimate


@torch.no_grad()
def embed_tokens(pipe_or_encoder: Any, prompts: Sequence[str], tokenizer: Any = None, max_length: Optional[int] = None,
                 batch_size: int = 64, token_budget: int = TOKEN_BUDGET, penultimate_output: bool = False,
                 progress: Optional[str] = None, into: Optional[Embeddings] = None) -> Embeddings:
    """Token embeddings at the encoder output (what the denoiser reads), per prompt: float32 [n, d] for
    positions 0..EOS (BOS and the counted tokens; padding dropped). Prompts already in `into` are skipped."""
    check_batching(batch_size, token_budget)
    enc, tok, penultimate = _single_encoder(pipe_or_encoder, tokenizer, penultimate_output)
    out: Embeddings = {} if into is None else into
    todo = [p for p in dict.fromkeys(prompts) if p not in out]
    if not todo:
        return out
    with corpus_batches(tok, todo, max_length, eos_id(enc, tok), batch_size, token_budget, progress=progress) as batches:
        for tb in batches:
            hidden = hook_activations(enc, tb.tokens, "output", penultimate).float().cpu()
            last = torch.where(tb.counted.any(1), tb.counted.int().cumsum(1).argmax(1), torch.zeros(len(tb), dtype=torch.long))
            for row, p in enumerate(tb.prompts):
                out[p] = hidden[row, : int(last[row]) + 1].clone()
    return out


def _batches(emb: Embeddings, prompts: Sequence[str], batch_size: int):
    """Padded [B, L, d] batches of cached embeddings and their counted masks (positions 1..EOS)."""
    for s in range(0, len(prompts), batch_size):
        rows = [emb[p] for p in prompts[s: s + batch_size]]
        L = max(r.shape[0] for r in rows)
        x = torch.zeros(len(rows), L, rows[0].shape[1])
        counted = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            x[i, : r.shape[0]] = r
            counted[i, 1: r.shape[0]] = True
        yield x, counted


# ------------------------------------------------------------------------------------------- edits
class Edit:
    """An edit of the encoder output: `apply(hidden [B, L, d], counted [B, L]) -> edited`. `fit` is
    called once with the unedited pooled training embeddings (concept, ordinary) before any apply."""

    name = "edit"

    def fit(self, concept: torch.Tensor, ordinary: torch.Tensor) -> None:
        pass

    def check(self, encoder: Any, penultimate: bool) -> None:
        pass

    def may_change(self, emb: Embeddings, prompts: Sequence[str]) -> Optional[torch.Tensor]:
        """bool [P]: prompts this edit can change (the others are returned unchanged without running it);
        None: all of them."""
        return None

    def apply(self, hidden: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class NoEdit(Edit):
    name = "none"

    def may_change(self, emb: Embeddings, prompts: Sequence[str]) -> Optional[torch.Tensor]:
        return torch.zeros(len(prompts), dtype=torch.bool)

    def apply(self, hidden: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        return hidden


def no_edit() -> Edit:
    """The floor: nothing changes."""
    return NoEdit()


_PRESENCE: "weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def latent_presence(sae: Any, emb: Embeddings, prompts: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
    """Per prompt, the latents in the top k with a value > 0 on some token at positions 1..EOS (sorted int64).
    Computed once per (SAE object, prompt) and remembered: the SAE's weights must not change afterwards."""
    seen = _PRESENCE.setdefault(sae, {})
    todo = [p for p in dict.fromkeys(prompts) if p not in seen]
    for s in range(0, len(todo), batch_size):
        chunk = todo[s: s + batch_size]
        x, counted = next(_batches(emb, chunk, len(chunk)))
        values, indices = backend.encode(x, sae)
        live = (values > 0) & counted.unsqueeze(-1)
        for i, p in enumerate(chunk):
            seen[p] = torch.unique(indices[i][live[i]].long())
    return [seen[p] for p in prompts]


def _holds_targets(sae: Any, targets: list[int], emb: Embeddings, prompts: Sequence[str]) -> torch.Tensor:
    t = torch.tensor(targets, dtype=torch.long)
    return torch.tensor([bool(torch.isin(lat, t).any()) for lat in latent_presence(sae, emb, prompts)],
                        dtype=torch.bool)


def _gate_flags(hidden: torch.Tensor, counted: torch.Tensor, sae: Any, targets: list[int], thr: Any,
                min_tokens: int) -> torch.Tensor:
    """bool [B]: the gate of `patch` and `detect` (>= min_tokens counted tokens on which some target
    exceeds its threshold)."""
    values, indices = backend.encode(hidden, sae)
    z = reference.target_activations(values, indices, targets)  # [B, L, T]
    return reference.gate_mask(z, counted.to(z.device), min_tokens, torch.as_tensor(thr, dtype=torch.float32))


class SNCEEdit(Edit):
    """The SNCE edit exactly as `snce_fast.patch` applies it at hook "output"."""

    def __init__(self, sae: Any, neurons: Any, scale: float = 0.0, clamp: Optional[float] = None,
                 mode: str = "residual", gate: bool = False, min_tokens: int = 1,
                 threshold: Union[float, Sequence[float]] = 0.0, name: Optional[str] = None):
        check_edit_args(mode, scale, clamp)
        positive_int(min_tokens, "min_tokens")
        if sae.hook != "output":
            raise ValueError(f"the SAE's hook is {sae.hook!r}: measure_erasure edits the encoder output, "
                             "expected an SAE trained at hook 'output'")
        targets = as_neuron_list(neurons, sae.n_latents)
        thr = reference.target_threshold_values(threshold, neurons, targets)
        options = dict(scale=scale, clamp=clamp, mode=mode, gate=gate, min_tokens=min_tokens, threshold=thr)
        self.sae, self.targets = sae, targets
        self.state = _PatchState(sae, targets, options, None)
        rule = f"clamp {clamp:g}" if clamp is not None else f"scale {scale:g}"
        self.name = name or f"snce {mode} {targets} {rule}" + (" gated" if gate else "")

    def check(self, encoder: Any, penultimate: bool) -> None:
        check_sae_fits(self.sae, encoder, penultimate)

    def may_change(self, emb: Embeddings, prompts: Sequence[str]) -> Optional[torch.Tensor]:
        # a residual edit (gated or not) returns every token on which no target fires bit-identical
        # (docs/method.md), and a gated reconstruct edit touches only prompts where a target fires
        if self.state.options["mode"] == "reconstruct" and not self.state.options["gate"]:
            return None
        return _holds_targets(self.sae, self.targets, emb, prompts)

    def apply(self, hidden: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        B, L, _ = hidden.shape
        edit_mask = (torch.arange(L) >= 1).expand(B, L)  # as the patch hook: BOS is never edited
        return backend.edit(hidden, self.state, self.targets, edit_mask=edit_mask, count_mask=counted,
                            **self.state.options)


def snce_edit(sae: Any, neurons: Any, **options: Any) -> Edit:
    """An SNCE edit (`patch`'s options: scale, clamp, mode, gate, min_tokens, threshold, and a name)."""
    return SNCEEdit(sae, neurons, **options)


def calibrated_edit(sae: Any, calibration: Any, n: int = 1, greedy: bool = True, **options: Any) -> Edit:
    """The SNCE edit of `calibration.top(n)` gated at its calibrated per-neuron thresholds."""
    neurons = calibration.top(n, greedy=greedy) if n > 1 else calibration.top(1)
    return SNCEEdit(sae, neurons, gate=True, threshold=calibration.thresholds_for(neurons),
                    min_tokens=calibration.min_tokens, **options)


class LeaceEdit(Edit):
    """LEACE (concept-erasure's LeaceEraser) fit on pooled training embeddings (concept vs ordinary) and
    applied to every token; with `gate=(sae, neurons, thresholds, min_tokens)` only to flagged prompts."""

    def __init__(self, gate: Optional[tuple] = None, name: Optional[str] = None):
        if importlib.util.find_spec("concept_erasure") is None:
            raise ImportError(LEACE_HINT)
        self.eraser: Any = None
        self.gate = None
        if gate is not None:
            sae, neurons, thr, min_tokens = gate
            targets = as_neuron_list(neurons, sae.n_latents)
            self.gate = (sae, targets, reference.target_threshold_values(thr, neurons, targets), min_tokens)
        self.name = name or ("leace" if gate is None else f"leace gated {self.gate[1]}")

    def check(self, encoder: Any, penultimate: bool) -> None:
        if self.gate is not None:
            check_sae_fits(self.gate[0], encoder, penultimate)

    def may_change(self, emb: Embeddings, prompts: Sequence[str]) -> Optional[torch.Tensor]:
        if self.gate is None:
            return None
        return _holds_targets(self.gate[0], self.gate[1], emb, prompts)  # the gate needs a target in the top k

    def fit(self, concept: torch.Tensor, ordinary: torch.Tensor) -> None:
        from concept_erasure import LeaceEraser

        x = torch.cat([concept, ordinary]).double()
        z = torch.cat([torch.ones(len(concept)), torch.zeros(len(ordinary))]).long()
        self.eraser = LeaceEraser.fit(x, z)

    def apply(self, hidden: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        if self.eraser is None:
            raise ValueError("LEACE is not fit yet: measure_erasure fits it on the training prompts first")
        erased = self.eraser(hidden.double()).to(hidden.dtype)
        if self.gate is None:
            return erased
        flags = _gate_flags(hidden, counted, *self.gate)
        return torch.where(flags[:, None, None], erased, hidden)


def leace_edit(gate: Optional[tuple] = None, name: Optional[str] = None) -> Edit:
    """LEACE on every token (or, with gate=(sae, neurons, thresholds, min_tokens), on flagged prompts only)."""
    return LeaceEdit(gate, name)


# ------------------------------------------------------------------------------------------- measurement
@dataclass
class _Edited:
    pooled: torch.Tensor
    changed: torch.Tensor  # bool [P]: some counted token differs
    rel: torch.Tensor  # [P]: ||X' - X||_F / ||X||_F over counted tokens


def _run_edit(edit: Edit, emb: Embeddings, prompts: Sequence[str], batch_size: int, bar: Any) -> _Edited:
    """The edit over `prompts`, in batches; prompts it cannot change (`may_change`) are not run through it."""
    P = len(prompts)
    pooled = torch.cat([mean_pool(x, c) for x, c in _batches(emb, prompts, batch_size)]) if P else torch.zeros(0)
    changed, rel = torch.zeros(P, dtype=torch.bool), torch.zeros(P)
    may = edit.may_change(emb, prompts)
    run = torch.arange(P) if may is None else may.nonzero().squeeze(1)
    if bar is not None:
        bar.update(P - len(run))
    for s in range(0, len(run), batch_size):
        idx = run[s: s + batch_size]
        x, counted = next(_batches(emb, [prompts[i] for i in idx], len(idx)))
        y = edit.apply(x, counted).float()
        m = counted.unsqueeze(-1)
        ch = ((y != x) & m).flatten(1).any(1)
        pooled[idx[ch]] = mean_pool(y, counted)[ch]  # an unchanged prompt keeps its unedited pooled embedding
        changed[idx] = ch
        rel[idx] = ((y - x) * m).flatten(1).norm(dim=1) / (x * m).flatten(1).norm(dim=1).clamp_min(1e-12)
        if bar is not None:
            bar.update(len(idx))
    return _Edited(pooled, changed, rel)


def _share(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")


def _collateral(after: _Edited, before: torch.Tensor, reader: LinearProbe) -> dict:
    ch = after.changed
    return {"n": int(ch.numel()), "changed": _share(ch),
            "mean_rel_change": float(after.rel[ch].mean()) if bool(ch.any()) else 0.0,
            "flag_before": _share(reader.flags(before)), "flag_after": _share(reader.flags(after.pooled))}


@dataclass
class ErasureResult:
    """The reader (fixed before any edit) and one report per edit (`reports[name]`, JSON-ready dicts)."""

    reader_threshold: float
    reader_fpr: float
    reports: dict = field(default_factory=dict)
    reader: Optional[LinearProbe] = None


@torch.no_grad()
def measure_erasure(pipe_or_encoder: Any, sets: PromptSets, edits: Union[Sequence[Edit], dict[str, Edit]],
                    tokenizer: Any = None, fpr: float = 0.05, max_length: Optional[int] = None, batch_size: int = 64,
                    token_budget: int = TOKEN_BUDGET, penultimate_output: bool = False,
                    embeddings: Optional[Embeddings] = None, progress: bool = False) -> ErasureResult:
    """Measure each edit at the embedding level (docs/efficacy.md).

    1. Fixed reader: a linear probe on unedited pooled embeddings (concept_train vs ordinary_train), its
       threshold fixed *before any edit* at `fpr` on ordinary_train. survival = share of the concept_test
       prompts it flags unedited that it still flags after the edit.
    2. Retrained reader: a fresh probe on edited training embeddings; held-out AUC on edited concept_test
       vs edited generic_test + matched_test (0.5 = linearly erased).
    3. Collateral on generic_test / matched_test: share changed at all, mean relative change where changed,
       the fixed reader's flag rate before and after.
    4. Pairs: cosine of (edited) concept to its unedited neutral twin, before and after; the fixed reader's
       flags on the concept members before / after; the share of neutral twins the edit changes at all.
    `embeddings` (from `embed_tokens`) is reused and extended; pass it to share one encoder pass.
    """
    sets.check()
    check_fpr(fpr)
    edits = dict(edits) if isinstance(edits, dict) else {e.name: e for e in edits}
    if not edits:
        raise ValueError("no edits to measure: expected at least one (e.g. snce_edit(sae, neurons))")
    enc = None
    if pipe_or_encoder is not None:
        enc, _, penultimate = _single_encoder(pipe_or_encoder, tokenizer, penultimate_output)
        for e in edits.values():
            e.check(enc, penultimate)
    emb: Embeddings = {} if embeddings is None else embeddings
    missing = [p for p in sets.all_prompts() if p not in emb]
    if missing:
        if pipe_or_encoder is None:
            raise ValueError(f"{len(missing)} prompts have no cached embeddings and no encoder was given")
        embed_tokens(pipe_or_encoder, missing, tokenizer, max_length, batch_size, token_budget, penultimate_output,
                     progress="embed" if progress else None, into=emb)
    groups = {"concept_train": list(sets.concept_train), "ordinary_train": list(sets.ordinary_train),
              "concept_test": list(sets.concept_test), "generic_test": list(sets.generic_test),
              "matched_test": list(sets.matched_test), "pair_concept": [c for c, _ in sets.pairs],
              "pair_neutral": [n for _, n in sets.pairs]}
    groups = {g: ps for g, ps in groups.items() if ps}
    plain = {g: _run_edit(NoEdit(), emb, ps, batch_size, None).pooled for g, ps in groups.items()}
    # the fixed reader: trained and thresholded on unedited embeddings, never touched again
    reader = fit_probe(plain["concept_train"], plain["ordinary_train"])
    reader.fix_threshold(plain["ordinary_train"], fpr)
    result = ErasureResult(reader.threshold, fpr, reader=reader)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(edits) * sum(len(ps) for ps in groups.values()), desc="erasure", unit="prompt")
    try:
        for name, e in edits.items():
            e.fit(plain["concept_train"], plain["ordinary_train"])
            done = {g: _run_edit(e, emb, ps, batch_size, bar) for g, ps in groups.items()}
            result.reports[name] = _report(done, plain, reader)
    finally:
        if bar is not None:
            bar.close()
    return result


def _report(done: dict, plain: dict, reader: LinearProbe) -> dict:
    before = reader.flags(plain["concept_test"])
    after = reader.flags(done["concept_test"].pooled)
    n_before = int(before.sum())
    retrained = fit_probe(done["concept_train"].pooled, done["ordinary_train"].pooled)
    neg = torch.cat([done[g].pooled for g in ("generic_test", "matched_test") if g in done])
    rep: dict[str, Any] = {
        "survival": int((after & before).sum()) / n_before if n_before else float("nan"),
        "concept_flag_before": _share(before), "concept_flag_after": _share(after),
        "concept_changed": _share(done["concept_test"].changed),
        "concept_rel_change": float(done["concept_test"].rel.mean()),
        "retrained_auc": auc(retrained.scores(done["concept_test"].pooled), retrained.scores(neg)),
        "fixed_reader_auc_after": auc(reader.scores(done["concept_test"].pooled), reader.scores(neg)),
        "n_concept_test": len(before), "n_flagged_before": n_before,
        "generic": _collateral(done["generic_test"], plain["generic_test"], reader),
    }
    if "matched_test" in done:
        rep["matched"] = _collateral(done["matched_test"], plain["matched_test"], reader)
    if "pair_concept" in done:
        neutral = plain["pair_neutral"]
        cos = torch.nn.functional.cosine_similarity
        rep["pairs"] = {"n": len(neutral), "cos_before": float(cos(plain["pair_concept"], neutral).mean()),
                        "cos_after": float(cos(done["pair_concept"].pooled, neutral).mean()),
                        "concept_flag_before": _share(reader.flags(plain["pair_concept"])),
                        "concept_flag_after": _share(reader.flags(done["pair_concept"].pooled)),
                        "neutral_changed": _share(done["pair_neutral"].changed),
                        "neutral_flag_after": _share(reader.flags(done["pair_neutral"].pooled))}
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rep.items()}
