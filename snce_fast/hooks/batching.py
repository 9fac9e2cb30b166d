"""Corpus batches sized by tokens: prompts are read in windows, sorted by token length inside a window
and cut into encoder calls of at most `batch_size` prompts and `token_budget` padded tokens, each padded
to its longest prompt (docs/performance.md, "Corpus passes"). Every batch carries the input positions
of its rows, so a pass writes its per-prompt results back in input order.

Counted tokens (1..EOS) do not depend on which prompts share a batch: CLIP attends causally and
masked encoders ignore padding, so bucketing changes only speed (tests/hooks/test_bucketing.py).
Tokenization runs on a background thread (`Prefetcher`), overlapping the encoder.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from snce_fast.checks import positive_int
from snce_fast.hooks.activations import corpus_tokenize, counted_mask, default_length

__all__ = ["BUCKETING", "BUCKET_WINDOW", "TOKEN_BUDGET", "Prefetcher", "TokenBatch", "bucketed", "corpus_batches", "plan"]

# prompts sorted together: bounded so memory stays flat and the first batch comes quickly
BUCKET_WINDOW = 1024
# padded tokens per encoder call (prompts x longest prompt): 128 CLIP prompts of 64 tokens, 256 captions of 32
TOKEN_BUDGET = 8192


@dataclass
class TokenBatch:
    """One encoder call: `index` int64 [B] (each row's position in the input), its `prompts`, the
    tokenizer's tensors padded to the longest row, and `counted` bool [B, L] (positions 1..EOS)."""

    index: torch.Tensor
    prompts: list[str]
    tokens: dict[str, torch.Tensor]
    counted: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())


# False: batches of `batch_size` consecutive prompts, in input order, no token budget (for comparisons)
BUCKETING = True


def plan(lengths: Sequence[int], batch_size: int, token_budget: int) -> list[list[int]]:
    """Positions of `lengths` grouped into batches, longest first: each batch holds at most `batch_size`
    prompts and (prompts x its longest length) <= `token_budget` tokens; a prompt longer than the budget
    gets a batch of its own. Ties keep input order, so the plan is deterministic."""
    if not BUCKETING:
        return [list(range(s, min(s + batch_size, len(lengths)))) for s in range(0, len(lengths), batch_size)]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * longest > token_budget):
            batches.append(cur)
            cur = []
        if not cur:
            longest = lengths[i]  # longest first: the first prompt of a batch sets its padded length
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def token_lengths(tokenizer: Any, prompts: Sequence[str], max_length: Optional[int]) -> list[int]:
    """Each prompt's token count (special tokens included, truncated as `corpus_tokenize` truncates)."""
    if not prompts:
        return []
    limit = max_length or default_length(tokenizer)
    ids = tokenizer(list(prompts), truncation=True, max_length=limit, padding=False)["input_ids"]
    return [len(x) for x in ids]


def bucketed(tokenizer: Any, prompts: Sequence[str], max_length: Optional[int], eos: Optional[int],
             batch_size: int, token_budget: int, offset: int = 0) -> list[TokenBatch]:
    """One window of prompts as token batches (see `plan`); `index` counts from `offset`."""
    lengths = token_lengths(tokenizer, prompts, max_length)
    out = []
    for rows in plan(lengths, batch_size, token_budget):
        texts = [prompts[i] for i in rows]
        tokens = corpus_tokenize(tokenizer, texts, max_length)
        counted = counted_mask(tokens["input_ids"], tokens.get("attention_mask"), eos)
        out.append(TokenBatch(torch.tensor(rows, dtype=torch.int64) + offset, texts, tokens, counted))
    return out


def check_batching(batch_size: int, token_budget: int) -> None:
    positive_int(batch_size, "batch_size")
    positive_int(token_budget, "token_budget")


def corpus_batches(tokenizer: Any, prompts: Iterable[str], max_length: Optional[int], eos: Optional[int],
                   batch_size: int = 64, token_budget: int = TOKEN_BUDGET, window: int = BUCKET_WINDOW,
                   prefetch: int = 2, progress: Optional[str] = None) -> "Prefetcher":
    """Token batches over `prompts` (any iterable of str), tokenized ahead on a background thread:
    use as `with corpus_batches(...) as batches: for b in batches: ...`. `b.index` is each row's position
    in `prompts`. `progress`: a progress bar with this description (prompts, prompts/s, and a total when
    `prompts` has a length)."""
    check_batching(batch_size, token_budget)
    positive_int(window, "window")

    def produce() -> Iterator[TokenBatch]:
        chunk: list[str] = []
        start = 0
        for p in prompts:
            chunk.append(p)
            if len(chunk) == window:
                yield from bucketed(tokenizer, chunk, max_length, eos, batch_size, token_budget, start)
                start += len(chunk)
                chunk = []
        if chunk:
            yield from bucketed(tokenizer, chunk, max_length, eos, batch_size, token_budget, start)

    bar = None
    if progress:
        total = len(prompts) if hasattr(prompts, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(desc=progress, unit="prompt", total=total, dynamic_ncols=True)
    return Prefetcher(produce(), depth=prefetch, bar=bar)


class Prefetcher(threading.Thread):
    """Runs an iterator on a background thread, `depth` items ahead of the consumer; an exception in
    the producer is raised in the consumer. Close it (or use `with`) so the thread never outlives the
    pass: a thread inside a tokenizer's native code at interpreter exit can abort the process."""

    def __init__(self, items: Iterator[Any], depth: int = 2, name: str = "snce-prefetch", bar: Any = None):
        super().__init__(daemon=True, name=name)
        self.items = items
        self.out: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.halt = threading.Event()
        self.bar = bar  # a tqdm bar advanced by len(item) as the consumer takes each item
        self._launched = False

    def run(self) -> None:
        try:
            for item in self.items:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put(("error", e))

    def _put(self, entry: tuple[str, Any]) -> bool:
        while not self.halt.is_set():
            try:
                self.out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        if not self._launched:
            self._launched = True
            self.start()
        while True:
            kind, item = self.out.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
            if self.bar is not None:
                self.bar.update(len(item))

    def close(self) -> None:
        """Stop producing and wait for the thread (it notices within 0.1 s between items)."""
        self.halt.set()
        if self._launched:
            self.join(timeout=60)
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
