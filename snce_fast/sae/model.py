"""The TopK sparse autoencoder module (docs/method.md)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import snce_fast.sae.export as export
import snce_fast.sae.hub as hub
import snce_fast.sae.importers as importers
import snce_fast.sae.native as native
from snce_fast.checks import Neurons, check_activations, check_finite, check_k, parse_hook, positive_int
from snce_fast.ops import backend
from snce_fast.sae.erasure import ErasureSAE
from snce_fast.sae.files import SAEFormatError, SAEWeights, as_dtype


class SAE(nn.Module):
    """TopK SAE: `W_enc [d, n]`, `b_enc [n]`, `W_dec [n, d]` (unit-norm rows), `b_dec [d]`, `k`.

    `encode`, `decode` and `edit` dispatch to the fastest available backend (Triton on
    CUDA tensors, the C++ extension or the eager reference on CPU); `snce_fast.reference`
    holds the ground truth with the same semantics.
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        hook: str = "output",
        encoder: Optional[str] = None,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
        init: bool = True,
    ):
        super().__init__()
        positive_int(d_in, "d_in")
        positive_int(n_latents, "n_latents")
        check_k(k, n_latents)
        self.hook = parse_hook(hook)
        self.k = k
        self.encoder_name = encoder
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.empty(d_in, n_latents, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **kw))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        if init:
            self.reset_parameters()

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[1]

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder transpose (OpenAI's init)."""
        w = torch.randn(self.n_latents, self.d_in, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (the TopK training constraint).

        Unlike a ReLU SAE, a TopK SAE cannot move the scale into the encoder without
        changing which latents win the top k, so this only touches W_dec.
        """
        norms = self.W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_((self.W_dec.float() / norms).to(self.W_dec.dtype))

    def config(self) -> dict[str, Any]:
        return {
            "format_version": native.FORMAT_VERSION,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.k,
            "hook": self.hook,
            "encoder": self.encoder_name,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
        }

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, hook={self.hook!r}"

    # -- compute -------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., d] -> (values [..., k] in x's dtype, indices [..., k] int32)."""
        check_activations(x, self.d_in)
        return backend.encode(x, self)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sparse decode: weighted gather of k rows of W_dec, plus b_dec."""
        return backend.decode(values, indices, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))

    def edit(
        self,
        x: torch.Tensor,
        neurons: Neurons,
        scale: float = 0.0,
        clamp: Optional[float] = None,
        mode: str = "residual",
        gate: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Suppress latents `neurons` in x (see `snce_fast.reference.edit` for every option)."""
        return backend.edit(x, self, neurons, scale=scale, clamp=clamp, mode=mode, gate=gate, **kwargs)

    # -- files ---------------------------------------------------------------------
    def slim(self, neurons: Neurons) -> ErasureSAE:
        """The slim erasure artifact for `neurons` (snce_fast.sae.ErasureSAE): the encoder and
        W_dec[neurons] only, all a residual-mode patch needs (about half the SAE's memory)."""
        return ErasureSAE.from_sae(self, neurons)

    def save(self, path: str) -> None:
        """Write `config.json` + `sae.safetensors` into directory `path` (atomically)."""
        native.write_sae(path, {k: getattr(self, k) for k in native.WEIGHT_KEYS}, self.config())

    def save_saelens(self, path: str | os.PathLike) -> Path:
        """Write the SAE as a SAELens 6 TopK SAE (`cfg.json` + `sae_weights.safetensors`), which
        `sae_lens.SAE.load_from_disk(path)` loads and runs with the same codes; returns the directory."""
        return export.write_saelens(self, path)

    def save_sparsify(self, path: str | os.PathLike) -> Path:
        """Write the SAE as an EleutherAI sparsify SparseCoder (`cfg.json` + `sae.safetensors`), which
        `sparsify.SparseCoder.load_from_disk(path)` loads; name the folder after the hookpoint module
        (e.g. `.../text_model.encoder.layers.8`) as sparsify does. Returns the directory."""
        return export.write_sparsify(self, path)

    def push_to_hub(self, repo_id: str, subfolder: Optional[str] = None, *, format: str = "native",
                    revision: Optional[str] = None, private: Optional[bool] = None, token: Optional[str] = None,
                    commit_message: Optional[str] = None) -> Any:
        """Upload the SAE to hub repo `repo_id` (created if missing) in `format` "native", "saelens" or
        "sparsify", under `subfolder`; returns huggingface_hub's commit info. `from_pretrained` reads it back."""
        writers = {"native": self.save, "saelens": self.save_saelens, "sparsify": self.save_sparsify}
        if format not in writers:
            raise ValueError(f"format={format!r} is not an SAE layout snce_fast writes: expected one of "
                             f"{list(writers)}")
        return hub.push_folder(writers[format], repo_id, subfolder, revision, private, token, commit_message)

    @classmethod
    def load(cls, path: str, device: Optional[torch.device | str] = None, *, hook: Optional[str] = None,
             dtype: Any = None) -> "SAE":
        """Load a native snce_fast SAE directory (config.json + sae.safetensors), checked against its config;
        `hook` replaces the stored hook point, `dtype` casts the weights."""
        importers.check_args(hook, dtype)
        w = native.read_sae(path)
        if dtype is not None:
            dt = as_dtype(dtype)
            w = w._replace(W_enc=w.W_enc.to(dt), b_enc=w.b_enc.to(dt), W_dec=w.W_dec.to(dt), b_dec=w.b_dec.to(dt))
        return cls._from_weights(w._replace(hook=parse_hook(hook)) if hook is not None else w, device)

    @classmethod
    def from_saelens(cls, path: str, device: Optional[torch.device | str] = None, *, hook: Optional[str] = None,
                     dtype: Any = None) -> "SAE":
        """Import a SAELens TopK SAE directory (cfg.json + sae_weights.safetensors) as SAELens runs it.
        `hook` replaces the hook point read from its hook_name; `dtype` that of the result (default: its config's)."""
        return cls._from_weights(importers.read_saelens(path, hook=hook, dtype=dtype), device)

    @classmethod
    def from_sparsify(cls, path: str, device: Optional[torch.device | str] = None, *, hook: Optional[str] = None,
                      dtype: Any = None) -> "SAE":
        """Import an EleutherAI sparsify SAE directory (cfg.json + sae.safetensors) as sparsify runs it.
        `hook` replaces the hook point read from the folder name (sparsify's hookpoint)."""
        return cls._from_weights(importers.read_sparsify(path, hook=hook, dtype=dtype), device)

    @classmethod
    def from_openai(cls, path: str, device: Optional[torch.device | str] = None, *, hook: Optional[str] = None,
                    dtype: Any = None) -> "SAE":
        """Import a TopK autoencoder in OpenAI's sparse_autoencoder layout (state_dict.pth + config.json
        with "normalize": false; see docs/formats.md). `hook` replaces config.json's hook."""
        return cls._from_weights(importers.read_openai(path, hook=hook, dtype=dtype), device)

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | os.PathLike, subfolder: Optional[str] = None,
                        revision: Optional[str] = None, *, device: Optional[torch.device | str] = None,
                        hook: Optional[str] = None, dtype: Any = None, cache_dir: Optional[str] = None) -> "SAE":
        """An SAE from a local directory or a Hugging Face hub repo (through huggingface_hub and its cache;
        offline with HF_HUB_OFFLINE=1), in any layout snce_fast reads: native, SAELens, sparsify or OpenAI's.
        A local directory wins over a hub id of the same name. `hook` / `dtype` as in the importers."""
        importers.check_args(hook, dtype)
        path = hub.resolve(repo_id_or_dir, subfolder, revision, cache_dir)
        layout = hub.detect_layout(path)
        if layout == "erasure":
            raise SAEFormatError(f"{str(path)!r} holds a slim erasure, not a full SAE: load it with "
                                 "snce_fast.ErasureSAE.from_pretrained")
        loaders = {"native": cls.load, "saelens": cls.from_saelens, "sparsify": cls.from_sparsify,
                   "openai": cls.from_openai}
        return loaders[layout](path, device, hook=hook, dtype=dtype)

    @classmethod
    def _from_weights(cls, w: SAEWeights, device: Optional[torch.device | str]) -> "SAE":
        sae = cls.from_tensors(w.W_enc, w.b_enc, w.W_dec, w.b_dec, k=int(w.k), hook=w.hook, encoder=w.encoder)
        return sae.to(device) if device is not None else sae

    @classmethod
    def random(cls, d_in: int, n_latents: int, k: int, seed: int = 0, hook: str = "output",
               dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None,
               enc_bias_std: float = 0.1, dec_bias_std: float = 0.1) -> "SAE":
        """A seeded random SAE (unit decoder rows, W_enc = W_dec^T, normal biases) for tests and benchmarks.
        The weights depend only on `seed` and the shape, not on the device or dtype."""
        g = torch.Generator().manual_seed(seed)
        sae = cls(d_in, n_latents, k, hook=hook)
        sae.reset_parameters(generator=g)
        with torch.no_grad():
            sae.b_enc.copy_(torch.randn(n_latents, generator=g) * enc_bias_std)
            sae.b_dec.copy_(torch.randn(d_in, generator=g) * dec_bias_std)
        return sae.to(device=device, dtype=dtype)

    @classmethod
    def from_tensors(
        cls,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        k: int,
        hook: str = "output",
        encoder: Optional[str] = None,
    ) -> "SAE":
        """Build an SAE from weight tensors after checking every shape and dtype."""
        if W_enc.dim() != 2:
            raise ValueError(f"W_enc has shape {tuple(W_enc.shape)}: expected [d_in, n_latents]")
        d, n = W_enc.shape
        expected = {"b_enc": (b_enc, (n,)), "W_dec": (W_dec, (n, d)), "b_dec": (b_dec, (d,))}
        for name, (t, shape) in expected.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}: expected {shape} (from W_enc [{d}, {n}])")
            if t.dtype != W_enc.dtype:
                raise ValueError(f"{name} has dtype {t.dtype}: expected {W_enc.dtype}, the dtype of W_enc")
        if not W_enc.is_floating_point():
            raise ValueError(f"W_enc has dtype {W_enc.dtype}: expected a floating-point dtype")
        check_finite({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
        sae = cls(d, n, k, hook=hook, encoder=encoder, dtype=W_enc.dtype, device=W_enc.device, init=False)
        with torch.no_grad():
            sae.W_enc.copy_(W_enc)
            sae.b_enc.copy_(b_enc)
            sae.W_dec.copy_(W_dec)
            sae.b_dec.copy_(b_dec)
        return sae
