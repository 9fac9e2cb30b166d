"""Training checkpoints (docs/training.md, "Metrics, checkpoints, resume").

`root/step_NNNNNNNNN/` holds `sae/` (SAE.save), `trainer.pt` (optimizer, counters, RNG, config)
and `data_rank{r}.pt` (each rank's stream state). It is written to a temp directory, fsynced and
renamed; then `root/latest` is replaced atomically and older checkpoints are deleted. A crash
therefore leaves `latest` naming a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from snce_fast.distributed import barrier, rank_and_world
from snce_fast.records.atomic import atomic_write_text
from snce_fast.sae.model import SAE
from snce_fast.train.config import RESUME_KEYS, TrainConfig
from snce_fast.train.step import SAETrainer
from snce_fast.train.stream import ActivationStream

__all__ = ["CKPT_LATEST", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

CKPT_LATEST = "latest"


def _fsync_files(directory: Path) -> None:
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(root: Path, trainer: SAETrainer, stream: ActivationStream, cfg: TrainConfig) -> Path:
    """Write step_NNNNNNNNN/ (sae/, trainer.pt, data_rank*.pt) via a temp dir + rename, then `latest`.
    A collective under torch.distributed: every rank calls it."""
    rank, _ = rank_and_world()
    name = f"step_{trainer.step_num:09d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save(stream.state_dict(), tmp / f"data_rank{rank}.pt")
    if rank == 0:
        trainer.sae.save(str(tmp / "sae"))
        state = trainer.state_dict()
        state["config"] = json.dumps(cfg.to_dict())
        torch.save(state, tmp / "trainer.pt")
    barrier()
    if rank == 0:
        _fsync_files(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / CKPT_LATEST, name + "\n")
        old = sorted(q for q in root.glob("step_*") if q.is_dir() and q.name != name)
        for q in old[: max(0, len(old) - (cfg.keep_checkpoints - 1))]:
            shutil.rmtree(q, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(root: Union[str, os.PathLike]) -> Optional[Path]:
    """The directory `root/latest` names, or None."""
    p = Path(root) / CKPT_LATEST
    if not p.is_file():
        return None
    d = Path(root) / p.read_text().strip()
    if not (d / "trainer.pt").is_file():
        raise FileNotFoundError(f"checkpoint {str(d)!r} named by {str(p)!r} is incomplete (no trainer.pt)")
    return d


def load_checkpoint(ckpt: Path, trainer: SAETrainer, stream: ActivationStream, cfg: TrainConfig) -> None:
    """Restore the SAE, the trainer and this rank's stream from `ckpt`, after checking that it was
    written with the same data-order settings (RESUME_KEYS) and world size."""
    state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    saved = json.loads(state["config"])
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume from {str(ckpt)!r}: settings differ ({desc}); use another checkpoint_dir")
    rank, world = rank_and_world()
    if int(state.get("world_size", 1)) != world:
        raise ValueError(f"cannot resume from {str(ckpt)!r}: it was written by {state.get('world_size')} ranks, "
                         f"this run has {world}")
    data = ckpt / f"data_rank{rank}.pt"
    if not data.is_file():
        raise FileNotFoundError(f"cannot resume rank {rank} of {world}: {str(data)!r} is missing (world size changed?)")
    sae = SAE.load(str(ckpt / "sae"), device=trainer.device)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(trainer.sae, name).copy_(getattr(sae, name))
    trainer.load_state_dict(state)
    stream.load_state_dict(torch.load(data, map_location="cpu", weights_only=True))
