"""`ScanStats`: the counters of a corpus scan (docs/method.md) and their files (docs/formats.md).

A saved scan is a directory: `manifest.json` (groups, skipped rows, scan settings and, for a
checkpoint, the resume state) + the tensor file it names (`stats-<batches>.safetensors`).
Both are written atomically (temp file, fsync, rename); the manifest's rename is the commit
point, so a crash at any moment leaves the previous complete checkpoint. Never pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from snce_fast.ops.histogram import STATE_FIELDS, Histograms
from snce_fast.records.atomic import atomic_write_bytes, json_text
from snce_fast.workflow.corpus import SKIP_REASONS

MANIFEST = "manifest.json"
FORMAT = "snce_fast.scan"
FORMAT_VERSION = 1
TENSOR_FIELDS = STATE_FIELDS + ("itd_prompts",)


@dataclass
class ScanStats:
    """Per group g and latent j: `prompts_fired`, `tokens_fired` (int64 [G, n]), `act_sum` (float64
    [G, n]), `itd_prompts` (int64 [G, n]: prompts whose top-`itd_top` latents by max activation
    include j); per group: `n_prompts`, `n_tokens` [G]; `skipped[group][reason]` rows skipped."""

    groups: list[str]
    prompts_fired: torch.Tensor
    tokens_fired: torch.Tensor
    act_sum: torch.Tensor
    n_prompts: torch.Tensor
    n_tokens: torch.Tensor
    itd_prompts: torch.Tensor
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def zeros(cls, groups: list[str], n_latents: int, device: Union[str, torch.device] = "cpu") -> "ScanStats":
        h = Histograms.zeros(len(groups), n_latents, device)
        itd = torch.zeros(len(groups), n_latents, dtype=torch.int64, device=device)
        skipped = {g: {r: 0 for r in SKIP_REASONS} for g in groups}
        return cls(list(groups), **h.tensors(), itd_prompts=itd, skipped=skipped)

    # -- views ---------------------------------------------------------------------
    @property
    def n_latents(self) -> int:
        return int(self.prompts_fired.shape[1])

    @property
    def histograms(self) -> Histograms:
        return Histograms(**{f: getattr(self, f) for f in STATE_FIELDS})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in TENSOR_FIELDS}

    def index(self, group: str) -> int:
        if group not in self.groups:
            raise KeyError(f"group {group!r} is not in this scan: expected one of {self.groups}")
        return self.groups.index(group)

    def frequency(self, group: str) -> torch.Tensor:
        """f_g(j) = prompts_fired[g, j] / n_prompts[g] (float64 [n])."""
        g = self.index(group)
        return self.prompts_fired[g].double() / max(int(self.n_prompts[g]), 1)

    def token_frequency(self, group: str) -> torch.Tensor:
        g = self.index(group)
        return self.tokens_fired[g].double() / max(int(self.n_tokens[g]), 1)

    def mean_activation(self, group: str) -> torch.Tensor:
        """act_sum[g] / n_tokens[g]: mean activation per counted token (0 where j did not fire)."""
        g = self.index(group)
        return self.act_sum[g] / max(int(self.n_tokens[g]), 1)

    def n_skipped(self, group: str) -> int:
        return sum(self.skipped.get(group, {}).values())

    def to(self, device: Union[str, torch.device]) -> "ScanStats":
        return ScanStats(self.groups, **{f: t.to(device) for f, t in self.tensors().items()},
                         skipped=json.loads(json.dumps(self.skipped)), meta=dict(self.meta))

    def __repr__(self) -> str:
        per = ", ".join(f"{g}: {int(p)} prompts" for g, p in zip(self.groups, self.n_prompts.tolist()))
        return f"ScanStats(n_latents={self.n_latents}, {per})"

    # -- files ---------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike], extra: dict[str, Any] | None = None) -> None:
        """Write `manifest.json` + a safetensors file into directory `path`, atomically."""
        write_stats(Path(path), self, extra or {})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "ScanStats":
        stats, _ = read_stats(Path(path))
        return stats.to(device)


def write_stats(path: Path, stats: ScanStats, extra: dict[str, Any]) -> None:
    """Tensor file first (named by its content hash), then the manifest that names it (the commit
    point), then old tensor files go."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in stats.tensors().items()}
    data = st_save(tensors)
    digest = hashlib.sha256(data).hexdigest()
    tensor_file = f"stats-{digest[:16]}.safetensors"
    atomic_write_bytes(path / tensor_file, data)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tensors": tensor_file,
        "tensors_sha256": digest,
        "groups": stats.groups,
        "n_latents": stats.n_latents,
        "skipped": stats.skipped,
        "meta": stats.meta,
        **extra,
    }
    atomic_write_bytes(path / MANIFEST, json_text(manifest, indent=1, sort_keys=True).encode())
    for old in path.glob("stats-*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a saved scan: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{file} holds a JSON {type(manifest).__name__}: expected an object")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: format {manifest.get('format')!r} is not {FORMAT!r}")
    version = manifest.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{file}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {version} is newer than {FORMAT_VERSION}")
    _check_manifest_fields(file, manifest)
    return manifest


def _check_manifest_fields(file: Path, manifest: dict[str, Any]) -> None:
    """The keys read_stats reads, present and of the right type: a ValueError naming the file and the key
    (never a KeyError or a TypeError from deep inside)."""
    for key in ("tensors", "groups", "n_latents"):
        if key not in manifest:
            raise ValueError(f"{file}: key {key!r} is missing (a scan manifest names its tensor file, groups "
                             "and n_latents)")
    tensors, groups, n = manifest["tensors"], manifest["groups"], manifest["n_latents"]
    if not isinstance(tensors, str) or not tensors or Path(tensors).name != tensors:
        raise ValueError(f"{file}: key 'tensors' is {tensors!r}: expected the name of a file beside it")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups):
        raise ValueError(f"{file}: key 'groups' is {groups!r}: expected a non-empty list of group names")
    if len(set(groups)) != len(groups):
        raise ValueError(f"{file}: key 'groups' names a group twice: {groups}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{file}: key 'n_latents' is {n!r}: expected a positive integer")
    for key, kind in (("skipped", dict), ("meta", dict), ("tensors_sha256", str)):
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], kind):
            raise ValueError(f"{file}: key {key!r} is {type(manifest[key]).__name__}: expected a {kind.__name__}")


def read_stats(path: Path) -> tuple[ScanStats, dict[str, Any]]:
    """(stats, manifest) of a saved scan or checkpoint; checks every tensor's shape and dtype."""
    manifest = read_manifest(path)
    file = path / manifest["tensors"]
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} (named by {path / MANIFEST}) is missing") from None
    if manifest.get("tensors_sha256") not in (None, hashlib.sha256(data).hexdigest()):
        raise ValueError(f"{file} does not match the sha256 in {path / MANIFEST}: truncated or overwritten")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"{file} is not a readable safetensors file ({e})") from None
    G, n = len(manifest["groups"]), int(manifest["n_latents"])
    expect = {"n_prompts": ((G,), torch.int64), "n_tokens": ((G,), torch.int64), "act_sum": ((G, n), torch.float64)}
    for name in TENSOR_FIELDS:
        shape, dtype = expect.get(name, ((G, n), torch.int64))
        t = tensors.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise ValueError(f"{file}: tensor {name!r} is {got}: expected {shape} {dtype}")
    stats = ScanStats(list(manifest["groups"]), **{k: tensors[k] for k in TENSOR_FIELDS},
                      skipped=manifest.get("skipped", {}), meta=manifest.get("meta", {}))
    return stats, manifest
