"""A slim erasure artifact (docs/api.md): what a residual-mode patch needs and nothing more.

A residual edit encodes with the whole encoder (`W_enc`, `b_enc`, `b_dec`: a top-k clamp cannot
be folded into the encoder's weights) but decodes only the target latents' rows `W_dec[T]`.
`ErasureSAE` keeps exactly those, so a deployment ships and holds about half of the SAE
(`W_dec` is as large as `W_enc`). Saved as `config.json` (format `snce_fast-erasure`) +
`erasure.safetensors`; loading checks every shape against the config and loads nothing on error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

import snce_fast.sae.hub as hub
from snce_fast.checks import Neurons, as_neuron_list, check_finite, check_k, parse_hook
from snce_fast.ops import backend
from snce_fast.sae.files import (
    CONFIG_FILE,
    ERASURE_FORMAT,
    ERASURE_WEIGHTS,
    SAEFormatError,
    check_shapes,
    finite_tensors,
    float_dtype,
    int_value,
    read_json,
    read_safetensors,
    require,
    require_int,
    write_artifact,
)

ERASURE_VERSION = 1
ERASURE_KEYS = ("W_enc", "b_enc", "b_dec", "W_dec_targets")


class ErasureSAE(nn.Module):
    """Encoder of an SAE + the decoder rows of its target latents; `patch` and `detect` accept it
    wherever they take an `SAE` (residual mode only: reconstruct mode needs the whole decoder)."""

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, W_dec_targets: torch.Tensor,
                 targets: Sequence[int], k: int, hook: str = "output", encoder: Optional[str] = None):
        super().__init__()
        d, n = W_enc.shape
        targets = [int(j) for j in targets]
        if tuple(b_enc.shape) != (n,) or tuple(b_dec.shape) != (d,) or tuple(W_dec_targets.shape) != (len(targets), d):
            raise ValueError(
                f"inconsistent erasure tensors: W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, b_dec "
                f"{tuple(b_dec.shape)}, W_dec_targets {tuple(W_dec_targets.shape)} for {len(targets)} target(s)"
            )
        as_neuron_list(targets, n)  # range check
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets {targets} repeat a latent: expected distinct latents, one decoder row each")
        check_k(k, n)
        check_finite({"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "W_dec_targets": W_dec_targets}, "the erasure")
        self.W_enc = nn.Parameter(W_enc.detach().clone(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.detach().clone(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.detach().clone(), requires_grad=False)
        self.W_dec_targets = nn.Parameter(W_dec_targets.detach().clone(), requires_grad=False)
        self.decoder_targets = targets
        self.k = int(k)
        self.hook = parse_hook(hook)
        self.encoder_name = encoder

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def n_latents(self) -> int:
        return int(self.W_enc.shape[1])

    @classmethod
    def from_sae(cls, sae: Any, neurons: Neurons) -> "ErasureSAE":
        """The slim artifact of `sae` for the target latents `neurons`."""
        targets = as_neuron_list(neurons, sae.n_latents)
        return cls(sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec.detach()[targets], targets, sae.k, sae.hook,
                   getattr(sae, "encoder_name", None))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return backend.encode(x, self)

    def config(self) -> dict[str, Any]:
        return {"format": ERASURE_FORMAT, "format_version": ERASURE_VERSION, "d_in": self.d_in,
                "n_latents": self.n_latents, "k": self.k, "hook": self.hook, "encoder": self.encoder_name,
                "dtype": str(self.W_enc.dtype).removeprefix("torch."), "targets": self.decoder_targets}

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, hook={self.hook!r}, targets={self.decoder_targets}"

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write config.json + erasure.safetensors (each atomically, weights first). Saved over a full
        snce_fast SAE, that SAE's sae.safetensors is removed afterwards (nothing would read it)."""
        write_artifact(path, ERASURE_WEIGHTS, {k: getattr(self, k) for k in ERASURE_KEYS},
                       {"format": ERASURE_FORMAT, "version": str(ERASURE_VERSION)}, self.config())

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None) -> "ErasureSAE":
        """Load a saved erasure, checking format, shapes and dtypes against its config."""
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a directory (expected config.json + {ERASURE_WEIGHTS})")
        file = str(p / CONFIG_FILE)
        cfg = read_json(p / CONFIG_FILE)
        if cfg.get("format") != ERASURE_FORMAT:
            raise SAEFormatError(f"{file}: format {cfg.get('format')!r} is not {ERASURE_FORMAT!r} "
                                 "(a full SAE loads with snce_fast.SAE.load)")
        if require_int(cfg, "format_version", file, 0) > ERASURE_VERSION:
            raise SAEFormatError(f"{file}: format_version {cfg['format_version']} is newer than this snce_fast "
                                 f"reads ({ERASURE_VERSION})")
        d, n, k = (require_int(cfg, key, file) for key in ("d_in", "n_latents", "k"))
        targets = require(cfg, "targets", file)
        if not isinstance(targets, list):
            raise SAEFormatError(f"{file}: targets={targets!r} is not a list of latent indices")
        targets = [int_value(j, f"targets[{i}]", file) for i, j in enumerate(targets)]
        dtype = float_dtype(str(require(cfg, "dtype", file)), file)
        wfile = str(p / ERASURE_WEIGHTS)
        sd = read_safetensors(p / ERASURE_WEIGHTS)
        if sorted(sd) != sorted(ERASURE_KEYS):
            raise SAEFormatError(f"{wfile} holds {sorted(sd)}: expected exactly {sorted(ERASURE_KEYS)}")
        want = {"W_enc": (d, n), "b_enc": (n,), "b_dec": (d,), "W_dec_targets": (len(targets), d)}
        check_shapes({name: (sd[name], shape) for name, shape in want.items()}, wfile)
        for name in want:
            if sd[name].dtype != dtype:
                raise SAEFormatError(f"{wfile}: {name} has dtype {sd[name].dtype}, {file} says {dtype}")
        finite_tensors({name: sd[name] for name in want}, wfile)
        out = cls(sd["W_enc"], sd["b_enc"], sd["b_dec"], sd["W_dec_targets"], targets, k, cfg.get("hook", "output"),
                  cfg.get("encoder"))
        return out.to(device) if device is not None else out

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: Union[str, os.PathLike], subfolder: Optional[str] = None,
                        revision: Optional[str] = None, *, device: Optional[Union[str, torch.device]] = None,
                        cache_dir: Optional[str] = None) -> "ErasureSAE":
        """A slim erasure from a local directory or a Hugging Face hub repo (through huggingface_hub and its
        cache; offline with HF_HUB_OFFLINE=1). A local directory wins over a hub id of the same name."""
        path = hub.resolve(repo_id_or_dir, subfolder, revision, cache_dir)
        layout = hub.detect_layout(path)
        if layout != "erasure":
            raise SAEFormatError(f"{str(path)!r} holds a full SAE ({layout} layout), not a slim erasure: load it "
                                 "with snce_fast.SAE.from_pretrained and make the erasure with sae.slim(neurons)")
        return cls.load(path, device=device)

    def push_to_hub(self, repo_id: str, subfolder: Optional[str] = None, *, revision: Optional[str] = None,
                    private: Optional[bool] = None, token: Optional[str] = None,
                    commit_message: Optional[str] = None) -> Any:
        """Upload the erasure (config.json + erasure.safetensors) to hub repo `repo_id` (created if missing),
        under `subfolder`; returns huggingface_hub's commit info. `from_pretrained` reads it back."""
        return hub.push_folder(self.save, repo_id, subfolder, revision, private, token, commit_message)
