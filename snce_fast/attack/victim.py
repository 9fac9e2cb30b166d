"""What an attack talks to (docs/robustness.md): a text encoder behind a defence, read by the fixed reader.

    Defence   an edit of the encoder output (`snce_fast.evaluation.efficacy` edits) and, when the edit is
              gated, the gate an erasure-aware attack must keep shut (latents, thresholds, min_tokens)
    Victim    encoder + tokenizer + defence + fixed reader: candidate token sequences in, reader scores of the
              *defended* output and gate decisions out; every encoder call is counted (`calls`)
    judge     attack prompts as text, through the same path `measure_erasure` measures (tokenize, encoder,
              edit, mean-pool, reader): flagged after the defence, gate fired

Candidates are sequences of whole-word tokens (`vocabulary`): joined with spaces they tokenize back to the
same ids, so the prompt a user would type is exactly the sequence the attack scored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from snce_fast.checks import as_neuron_list, positive_int
from snce_fast.evaluation import efficacy
from snce_fast.evaluation.probes import LinearProbe, mean_pool
from snce_fast.hooks.activations import encoder_positions, uses_attention_mask
from snce_fast.hooks.patching import text_encoders
from snce_fast.hooks.points import run_to_hook
from snce_fast.ops import backend, reference


@dataclass
class Gate:
    """The gate of a gated edit: a prompt is edited when some latent of `targets` exceeds its threshold on
    at least `min_tokens` counted tokens (reference.gate_mask, as `patch` and `detect`)."""

    sae: Any
    targets: list[int]
    thresholds: list[float]
    min_tokens: int = 1

    def __post_init__(self) -> None:
        neurons = list(self.targets)
        self.targets = as_neuron_list(neurons, self.sae.n_latents)
        thr = reference.target_threshold_values(self.thresholds, neurons, self.targets)
        self.thresholds = [thr] * len(self.targets) if isinstance(thr, float) else list(thr)
        positive_int(self.min_tokens, "min_tokens")

    def activations(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 [B, L, T]: each target's value (0 where it is not in the token's top k)."""
        values, indices = backend.encode(hidden, self.sae)
        return reference.target_activations(values, indices, self.targets)

    def fires(self, hidden: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """bool [B]: the gate opens (the edit runs) on these prompts."""
        thr = torch.tensor(self.thresholds, dtype=torch.float32)
        return reference.gate_mask(self.activations(hidden), counted, self.min_tokens, thr)

    def margin(self, hidden: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """float [B]: the largest (activation - threshold) over counted tokens and targets (< 0: no target
        fires anywhere; with min_tokens 1 the gate stays shut exactly when margin <= 0)."""
        z = self.activations(hidden) - torch.tensor(self.thresholds, dtype=torch.float32)
        z = z.masked_fill(~counted.unsqueeze(-1), -torch.inf)
        return z.flatten(1).amax(1)


@dataclass
class Defence:
    """An edit of the encoder output and the gate it opens on (None: the edit runs on every prompt)."""

    name: str
    edit: efficacy.Edit
    gate: Optional[Gate] = None


def snce_defence(name: str, sae: Any, neurons: Sequence[int], thresholds: Sequence[float], min_tokens: int = 1,
                 **options: Any) -> Defence:
    """The gated SNCE edit of `patch(sae, neurons, gate=True, threshold=thresholds, ...)` (options: scale, clamp)."""
    edit = efficacy.snce_edit(sae, list(neurons), gate=True, threshold=list(thresholds), min_tokens=min_tokens,
                              name=name, **options)
    return Defence(name, edit, Gate(sae, list(neurons), list(thresholds), min_tokens))


def no_edit_defence() -> Defence:
    """The floor: nothing is edited (attacks are judged on the plain encoder output)."""
    return Defence("no edit", efficacy.no_edit())


def leace_defence(name: str, gate: Optional[Gate] = None) -> Defence:
    """LEACE on every prompt, or (with a gate) on the prompts the gate flags; fit it with `fit_defences`."""
    spec = None if gate is None else (gate.sae, gate.targets, gate.thresholds, gate.min_tokens)
    return Defence(name, efficacy.leace_edit(gate=spec, name=name), gate)


def vocabulary(tokenizer: Any, limit: Optional[int] = None) -> torch.Tensor:
    """int64 ids of whole-word alphabetic tokens that tokenize back to themselves alone (special tokens,
    word pieces and punctuation left out): the attacks' search space."""
    size = len(tokenizer)
    ids = list(range(size))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts = [tokenizer.decode([i]).strip() for i in ids]
    keep = [i for i, t in zip(ids, texts) if i not in special and t.isalpha() and t.isascii()]
    back = tokenizer([texts[i] for i in keep], add_special_tokens=False)["input_ids"]
    out = [i for i, b in zip(keep, back) if list(b) == [i]]
    if limit is not None:
        out = out[:limit]
    if not out:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no whole-word alphabetic token that "
                         "tokenizes back to itself: expected a word-level vocabulary to search over")
    return torch.tensor(out, dtype=torch.long)


def _specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the content when the tokenizer adds its special tokens (e.g. [CLS] / [SEP])."""
    for word in ("a", "the", "x"):
        full = list(tokenizer(word)["input_ids"])
        plain = list(tokenizer(word, add_special_tokens=False)["input_ids"])
        for i in range(len(full) - len(plain) + 1):
            if plain and full[i: i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
    raise ValueError(f"cannot tell where {type(tokenizer).__name__} puts a prompt between its special tokens")


class Victim:
    """`encoder` (a bare text encoder or a one-encoder pipeline) behind `defence`, read by `reader` (a
    LinearProbe with its threshold fixed). `calls` counts sequences run through the encoder (one forward
    pass each; a gradient step is one call). `watch`: the gate whose firing is reported for defences without
    one (e.g. the calibrated top-1 latent under LEACE)."""

    def __init__(self, encoder: Any, tokenizer: Any, reader: LinearProbe, defence: Optional[Defence] = None,
                 watch: Optional[Gate] = None, penultimate_output: bool = False, batch_size: int = 64):
        (name, (enc, penultimate)), = text_encoders(encoder, penultimate_output).items()
        if reader.threshold != reader.threshold:
            raise ValueError("the reader's threshold is not fixed: call reader.fix_threshold(ordinary, fpr) first")
        self.encoder, self.tokenizer, self.penultimate = enc, tokenizer, penultimate
        self.reader = reader
        self.defence = defence or no_edit_defence()
        self.watch = self.defence.gate or watch
        self.batch_size = positive_int(batch_size, "batch_size")
        self.calls = 0
        self.masked = uses_attention_mask(enc)
        self.embedding = enc.get_input_embeddings()
        self.prefix, self.suffix = _specials(tokenizer)  # the special ids around a prompt's content

    def with_defence(self, defence: Defence) -> "Victim":
        """The same encoder and reader behind another defence (a fresh call counter)."""
        return Victim(self.encoder, self.tokenizer, self.reader, defence, self.watch, self.penultimate,
                      self.batch_size)

    # -- token sequences ----------------------------------------------------------------------------------
    def ids(self, content: torch.Tensor) -> torch.Tensor:
        """[B, n] content ids -> [B, n + specials] model input ids (BOS/CLS ... EOS/SEP)."""
        B = len(content)
        out = torch.cat([torch.tensor(self.prefix, dtype=torch.long).expand(B, -1), content.long(),
                         torch.tensor(self.suffix, dtype=torch.long).expand(B, -1)], 1)
        limit = encoder_positions(self.encoder)
        if limit is not None and out.shape[1] > limit:
            raise ValueError(f"sequences of {out.shape[1]} tokens are longer than the encoder reads ({limit})")
        return out

    def text(self, content: torch.Tensor) -> str:
        """One content sequence as the prompt a user would type."""
        return self.tokenizer.decode([int(i) for i in content], skip_special_tokens=True).strip()

    def content(self, prompt: str, length: Optional[int] = None) -> torch.Tensor:
        """A prompt's content ids (no special tokens), truncated to `length`."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids[:length] if length else ids, dtype=torch.long)

    def hidden(self, content: torch.Tensor, embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output [B, L, d] and counted mask [B, L] (positions 1..EOS) of equal-length content rows.
        `embed`: replaces the input embedding lookup (for gradients through one-hot inputs)."""
        ids = self.ids(content)
        self.calls += len(ids)
        kwargs: dict[str, Any] = {"input_ids": ids}
        if self.masked:
            kwargs["attention_mask"] = torch.ones_like(ids)
        handle = None
        if embed is not None:
            handle = self.embedding.register_forward_hook(lambda m, i, o: embed(o))
        try:
            h = run_to_hook(self.encoder, "output", lambda: self.encoder(**kwargs), self.penultimate)
        finally:
            if handle is not None:
                handle.remove()
        counted = torch.zeros(ids.shape, dtype=torch.bool)
        counted[:, 1:] = True  # no padding: every position after BOS up to the final EOS counts
        return h.float(), counted

    @torch.no_grad()
    def evaluate(self, content: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reader score of the defended output [B], gate fired [B], gate margin [B]) for content rows [B, n];
        the watched gate when the defence has none (margin -inf and fired False when there is none)."""
        scores, fired, margin = [], [], []
        for s in range(0, len(content), self.batch_size):
            h, counted = self.hidden(content[s: s + self.batch_size])
            y = self.defence.edit.apply(h, counted).float()
            scores.append(self.reader.scores(mean_pool(y, counted)))
            if self.watch is not None:
                fired.append(self.watch.fires(h, counted))
                margin.append(self.watch.margin(h, counted))
            else:
                fired.append(torch.zeros(len(h), dtype=torch.bool))
                margin.append(torch.full((len(h),), -torch.inf))
        return torch.cat(scores), torch.cat(fired), torch.cat(margin)

    @torch.no_grad()
    def pooled(self, content: torch.Tensor) -> torch.Tensor:
        """Mean-pooled *undefended* encoder output [B, d] (what a model-agnostic attack sees)."""
        out = []
        for s in range(0, len(content), self.batch_size):
            h, counted = self.hidden(content[s: s + self.batch_size])
            out.append(mean_pool(h, counted))
        return torch.cat(out)


@torch.no_grad()
def judge(victim: Victim, prompts: Sequence[str], max_length: Optional[int] = None,
          embeddings: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Prompts as text through `measure_erasure`'s path (efficacy.embed_tokens, the defence's edit, mean
    pooling, the fixed reader): {"score", "flagged", "fired"} per prompt. Not counted in `victim.calls`."""
    emb = efficacy.embed_tokens(victim.encoder, list(prompts), victim.tokenizer, max_length=max_length,
                                penultimate_output=victim.penultimate, into=embeddings)
    scores, fired = [], []
    for x, counted in efficacy._batches(emb, list(prompts), victim.batch_size):
        scores.append(victim.reader.scores(mean_pool(victim.defence.edit.apply(x, counted).float(), counted)))
        fired.append(victim.watch.fires(x, counted) if victim.watch is not None
                     else torch.zeros(len(x), dtype=torch.bool))
    s = torch.cat(scores) if scores else torch.zeros(0)
    return {"score": s, "flagged": s > victim.reader.threshold,
            "fired": torch.cat(fired) if fired else torch.zeros(0, dtype=torch.bool)}


def fit_defences(defences: Sequence[Defence], concept: torch.Tensor, ordinary: torch.Tensor) -> None:
    """`edit.fit` each defence on pooled unedited training embeddings (LEACE), as `measure_erasure` does."""
    for d in defences:
        d.edit.fit(concept, ordinary)
