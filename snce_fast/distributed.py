"""torch.distributed helpers shared by training and scanning.

Every helper works in a plain single process too: without an initialised process group the
rank is 0, the world size 1, and the collectives return at once without touching their input.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["all_reduce", "barrier", "broadcast", "is_distributed", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when more than one process takes part (an initialised group of world size > 1)."""
    return rank_and_world()[1] > 1


def all_reduce(t: torch.Tensor, op: Optional[Any] = None) -> torch.Tensor:
    """All-reduce `t` in place (sum unless `op` is given) and return it."""
    if is_distributed():
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` on every rank with rank `src`'s copy, in place, and return it."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        dist.barrier()
