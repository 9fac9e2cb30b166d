"""The training data path (docs/training.md, "Data path"): prompts -> tokenize -> the encoder up to
the hook point -> counted token rows (BOS and padding excluded by default) -> a bounded shuffle
buffer (memory flat in corpus size) -> batches; with `cache_dir`, epoch 0 also appends every row to
a raw float32 file that later epochs replay through `numpy.memmap` in shuffled blocks.

Under torch.distributed rank r reads prompts i with i % world == r, with its own buffer and cache.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from snce_fast.distributed import rank_and_world
from snce_fast.hooks.activations import eos_id, hook_activations, tokenize
from snce_fast.hooks.batching import bucketed
from snce_fast.train.config import TrainConfig

__all__ = ["ActivationStream"]


class ActivationStream:
    """Prompts -> hook activations of counted tokens -> shuffled batches of `batch_size` rows.

    A shuffle buffer of `shuffle_buffer` rows (plus at most one encoder chunk) bounds memory.
    Its whole state (epoch, prompts consumed, buffer rows, RNG, cache rows written) is in
    `state_dict()`, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        prompts: Iterable[str],
        cfg: TrainConfig,
        d: int,
        device: torch.device,
    ):
        self.encoder, self.tokenizer, self.prompts, self.cfg, self.d = encoder, tokenizer, prompts, cfg, d
        self.device = device
        self.rank, self.world = rank_and_world()
        self.eos = eos_id(encoder, tokenizer)
        self.gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.rank)
        self.epoch = 0
        self.pos = 0  # prompts (epoch 0 / no cache) or cache blocks consumed in this epoch
        self.buf = torch.empty(0, d, device=device)
        self.n = 0
        self.final = False
        self.tokens_in = 0
        self.prompts_in = 0
        self.cache_rows = 0
        self._it: Optional[Iterator[str]] = None
        self._cache_file: Optional[Any] = None
        self._cache_map: Optional[np.memmap] = None
        self._block_order: Optional[torch.Tensor] = None
        self.cache_path = (Path(cfg.cache_dir) / f"activations_rank{self.rank}.f32") if cfg.cache_dir else None

    # source of chunks
    def _prompt_iter(self) -> Iterator[str]:
        it = iter(self.prompts)
        if self.epoch > 0 and it is self.prompts:
            raise ValueError(
                f"epochs={self.cfg.epochs} needs prompts that can be iterated again (a list or a re-iterable "
                "corpus), or cache_dir= to replay activations from disk; got a one-shot iterator"
            )
        if self.world > 1:
            it = itertools.islice(it, self.rank, None, self.world)
        return itertools.islice(it, self.pos, None)

    def _uses_cache_now(self) -> bool:
        return self.cache_path is not None and self.epoch > 0

    def _next_chunk(self) -> Optional[torch.Tensor]:
        if self._uses_cache_now():
            return self._next_cache_chunk()
        if self._it is None:
            self._it = self._prompt_iter()
        batch = list(itertools.islice(self._it, self.cfg.prompt_window))
        if not batch:
            self._it = None
            return None
        for i, p in enumerate(batch):
            if not isinstance(p, str):
                raise TypeError(
                    f"prompt {self.pos + i} (rank {self.rank}) is a {type(p).__name__}, not a str: {p!r:.80}"
                )
        chunk = self._activations(batch)
        self.pos += len(batch)
        self.prompts_in += len(batch)
        if self.cache_path is not None and self.epoch == 0:
            self._append_cache(chunk)
        return chunk

    @torch.no_grad()
    def _activations(self, batch: list[str]) -> torch.Tensor:
        """Counted-token rows of a chunk of prompts; without padding rows the chunk is sorted by length
        and encoded in token batches (`snce_fast.hooks.batching`), the rows in that deterministic order."""
        cfg = self.cfg
        if cfg.include_padding:  # padding rows are training data: pad to the tokenizer's length
            toks = tokenize(self.tokenizer, batch, cfg.max_length)
            ids = toks["input_ids"]
            parts = [self._rows(toks, torch.ones_like(ids, dtype=torch.bool), batch)]
        else:
            parts = []
            for tb in bucketed(self.tokenizer, batch, cfg.max_length, self.eos, cfg.prompt_batch_size,
                               cfg.token_budget):
                ids = tb.tokens["input_ids"]
                parts.append(self._rows(tb.tokens, tb.counted | (torch.arange(ids.shape[1]) == 0), batch))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _rows(self, toks: dict[str, torch.Tensor], mask: torch.Tensor, batch: list[str]) -> torch.Tensor:
        cfg = self.cfg
        hidden = hook_activations(self.encoder, toks, cfg.hook, cfg.penultimate_output)  # [B, L, d']
        if hidden.shape[-1] != self.d:
            raise ValueError(
                f"the encoder's activations at hook {cfg.hook!r} have width {hidden.shape[-1]}, "
                f"but the SAE has d_in={self.d}"
            )
        if not cfg.include_bos:
            mask = mask & (torch.arange(mask.shape[1]) >= 1)
        rows = hidden[mask.to(hidden.device)].to(self.device, torch.float32)
        if rows.numel() and not bool(torch.isfinite(rows).all()):
            bad = (~torch.isfinite(rows)).any(-1).nonzero()[0, 0].item()
            raise ValueError(
                f"the encoder produced NaN/inf activations at hook {cfg.hook!r} for prompts "
                f"{self.pos}..{self.pos + len(batch) - 1} of rank {self.rank} (first bad token row {bad}); "
                "check the encoder's weights and dtype (fp16 overflow?)"
            )
        return rows

    def _append_cache(self, chunk: torch.Tensor) -> None:
        assert self.cache_path is not None
        if self._cache_file is None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            mode = "r+b" if self.cache_path.exists() else "wb"
            f = open(self.cache_path, mode)
            f.truncate(self.cache_rows * self.d * 4)  # drop rows written after the last checkpoint
            f.seek(0, os.SEEK_END)
            self._cache_file = f
        self._cache_file.write(chunk.cpu().numpy().astype(np.float32, copy=False).tobytes())
        self.cache_rows += chunk.shape[0]

    def _next_cache_chunk(self) -> Optional[torch.Tensor]:
        assert self.cache_path is not None
        if self._cache_map is None:
            if self._cache_file is not None:
                self._cache_file.close()
                self._cache_file = None
            if self.cache_rows == 0:
                return None
            self._cache_map = np.memmap(self.cache_path, dtype=np.float32, mode="r", shape=(self.cache_rows, self.d))
        if self._block_order is None:
            n_blocks = -(-self.cache_rows // self.cfg.cache_block)
            g = torch.Generator().manual_seed(self.cfg.seed * 104729 + self.epoch * 31 + self.rank)
            self._block_order = torch.randperm(n_blocks, generator=g)
        if self.pos >= len(self._block_order):
            self._block_order = None
            return None
        b = int(self._block_order[self.pos])
        self.pos += 1
        B = self.cfg.cache_block
        return torch.from_numpy(np.array(self._cache_map[b * B : (b + 1) * B])).to(self.device)

    # buffer
    def _push(self, chunk: torch.Tensor) -> None:
        m = chunk.shape[0]
        if self.n + m > self.buf.shape[0]:
            grown = torch.empty(self.n + m, self.d, device=self.device)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : self.n + m] = chunk
        self.n += m
        self.tokens_in += m

    def _pop(self, B: int) -> torch.Tensor:
        sel = torch.randperm(self.n, generator=self.gen)[:B]
        sel_d = sel.to(self.device)
        out = self.buf[sel_d].clone()
        tail = self.n - B
        taken = torch.zeros(self.n, dtype=torch.bool)
        taken[sel] = True
        holes = sel[sel < tail]
        fillers = torch.arange(tail, self.n)[~taken[tail:]]
        if holes.numel():
            self.buf[holes.to(self.device)] = self.buf[fillers.to(self.device)]
        self.n = tail
        return out

    def next_batch(self) -> Optional[torch.Tensor]:
        """The next shuffled batch [batch_size, d], or None when the data is spent."""
        B = self.cfg.batch_size
        while True:
            if self.n >= max(B, self.cfg.shuffle_buffer) or (self.final and self.n >= B):
                return self._pop(B)
            if self.final:
                return None
            chunk = self._next_chunk()
            if chunk is None:  # this epoch's source is spent
                if self.epoch == 0 and self.tokens_in == 0:
                    raise ValueError(
                        f"the corpus gave no tokens on rank {self.rank} (empty prompts, or every token excluded "
                        f"by include_bos={self.cfg.include_bos}/include_padding={self.cfg.include_padding})"
                    )
                if self.epoch + 1 < (self.cfg.epochs or 1):  # None (unplanned): one pass
                    self.epoch += 1
                    self.pos = 0
                else:
                    self.final = True
                continue
            self._push(chunk)

    def estimated_batches(self, n_prompts: Optional[int]) -> Optional[int]:
        """The batches this rank's whole run gives (every epoch, resumed steps included), for a
        progress bar's total: exact once epoch 0 has been read, extrapolated from the tokens per
        prompt so far before that; None while unknown (no prompt read yet, or `n_prompts` None,
        a corpus without a length, before its activations are cached)."""
        epochs = self.cfg.epochs or 1
        if self.cache_path is not None and self.epoch > 0:
            total = self.cache_rows * epochs
        elif n_prompts is None or self.prompts_in == 0:
            return None
        else:
            mine = len(range(self.rank, n_prompts, self.world))
            total = self.tokens_in * mine * epochs // self.prompts_in  # integers: exact once an epoch is read
        return total // self.cfg.batch_size

    def close(self) -> None:
        if self._cache_file is not None:
            self._cache_file.flush()
            self._cache_file.close()
            self._cache_file = None
        self._cache_map = None

    def state_dict(self) -> dict[str, Any]:
        if self._cache_file is not None:
            self._cache_file.flush()
            os.fsync(self._cache_file.fileno())
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "n": self.n,
            "buffer": self.buf[: self.n].cpu().clone(),
            "final": self.final,
            "tokens_in": self.tokens_in,
            "prompts_in": self.prompts_in,
            "cache_rows": self.cache_rows,
            "gen": self.gen.get_state(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.close()
        self.epoch, self.pos, self.n = int(sd["epoch"]), int(sd["pos"]), int(sd["n"])
        self.buf = sd["buffer"].to(self.device, torch.float32).clone()
        self.final = bool(sd["final"])
        self.tokens_in, self.prompts_in = int(sd["tokens_in"]), int(sd["prompts_in"])
        self.cache_rows = int(sd["cache_rows"])
        self.gen.set_state(sd["gen"])
        self._it = None
        self._block_order = None
        if self.cache_path is not None and self.epoch == 0 and self.cache_path.exists():
            with open(self.cache_path, "r+b") as f:
                f.truncate(self.cache_rows * self.d * 4)
