"""Training checkpoints (docs/training.md, "Metrics, checkpoints, resume").

`root/step_NNNNNNNNN/` holds `sae/` (SAE.save), `trainer.pt` (optimizer, counters, RNG, config,
and the run's report state: per-step history, the last steps' metrics, training seconds so far)
and `data_rank{r}.pt` (each rank's stream state). It is written to a temp directory, fsynced and
renamed; then `root/latest` is replaced atomically and older checkpoints are deleted. A crash
therefore leaves `latest` naming a complete checkpoint. A file that cannot be read back
(truncated, corrupted, or holding anything but tensors and plain values) is refused with a
ValueError naming it.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Optional, Union

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


def save_checkpoint(root: Path, trainer: SAETrainer, stream: ActivationStream, cfg: TrainConfig,
                    run: Optional[dict[str, Any]] = None) -> Path:
    """Write step_NNNNNNNNN/ (sae/, trainer.pt, data_rank*.pt) via a temp dir + rename, then `latest`.
    `run`: the report's state (plain values: history, recent metrics, elapsed seconds), stored in
    trainer.pt and returned by `load_checkpoint`. A collective under torch.distributed: every rank calls it."""
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
        if run is not None:
            state["run"] = run
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


def _read_pt(path: Path, what: str) -> Any:
    """torch.load(weights_only=True) of a checkpoint file; anything unreadable is a one-line ValueError
    naming the file (torch raises RuntimeError / UnpicklingError / EOFError with long messages)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        why = "it holds Python objects other than tensors and plain values (refused without running them)"
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, ImportError,
            IndexError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        why = "it is truncated or corrupted" if isinstance(e, EOFError) or "zip archive" in first else \
            f"it cannot be read ({type(e).__name__}: {first[:120]})"
    raise ValueError(f"cannot resume from {str(path)!r}: {why}, not a {what} written by snce_fast; delete the "
                     "checkpoint directory or use another checkpoint_dir")


_TRAINER_KEYS = ("optimizer", "step", "tokens", "since_fired", "ever_fired", "torch_rng", "config")


def _read_trainer_state(path: Path) -> dict[str, Any]:
    state = _read_pt(path, "trainer checkpoint")
    missing = [k for k in _TRAINER_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        got = f"a {type(state).__name__}" if not isinstance(state, dict) else f"no {', '.join(missing)}"
        raise ValueError(f"cannot resume from {str(path)!r}: it holds {got}, not a trainer checkpoint written by "
                         "snce_fast; delete the checkpoint directory or use another checkpoint_dir")
    try:
        state["config"] = json.loads(state["config"])
    except (TypeError, ValueError):
        state["config"] = None
    if not isinstance(state["config"], dict):
        raise ValueError(f"cannot resume from {str(path)!r}: its 'config' is not the JSON of a TrainConfig")
    return state


def load_checkpoint(ckpt: Path, trainer: SAETrainer, stream: ActivationStream,
                    cfg: TrainConfig) -> Optional[dict[str, Any]]:
    """Restore the SAE, the trainer and this rank's stream from `ckpt`, after checking that it was
    written with the same data-order settings (RESUME_KEYS) and world size. Returns the `run` state
    saved with it (None for a checkpoint written without one)."""
    state = _read_trainer_state(ckpt / "trainer.pt")
    saved = state["config"]
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
    data_state = _read_pt(data, "data-stream checkpoint")
    sae = SAE.load(str(ckpt / "sae"), device=trainer.device)
    try:
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(trainer.sae, name).copy_(getattr(sae, name))
        trainer.load_state_dict(state)
        stream.load_state_dict(data_state)
    except (KeyError, TypeError, RuntimeError, AttributeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot resume from {str(ckpt)!r}: its state does not fit this run "
                         f"({type(e).__name__}: {first}); use another checkpoint_dir") from None
    return _check_run(state.get("run"), ckpt / "trainer.pt")


def _check_run(run: Any, path: Path) -> Optional[dict[str, Any]]:
    """The `run` state of a trainer.pt, checked (None: a checkpoint written without one)."""
    if run is None:
        return None
    ok = (isinstance(run, dict) and isinstance(run.get("history"), list) and isinstance(run.get("recent"), list)
          and isinstance(run.get("elapsed_s"), (int, float))
          and all(isinstance(m, dict) for m in run["history"])
          and all(isinstance(m, dict) and {"fvu", "l0", "aux_loss"} <= set(m) for m in run["recent"]))
    if not ok:
        raise ValueError(f"cannot resume from {str(path)!r}: its 'run' record (history, recent metrics, elapsed_s) "
                         "is malformed; delete the checkpoint directory or use another checkpoint_dir")
    return run
