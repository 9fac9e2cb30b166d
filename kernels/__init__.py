"""Triton kernels for SNCE, installed as `snce_fast.kernels` (never a top-level module).

`available()` says whether they can run; `encode`, `decode` and `edit` have the
signatures, validation and semantics of `snce_fast.reference` and are what the backend
calls for CUDA tensors (or any tensors with `SNCE_FAST_BACKEND=triton`, which on the
CPU needs `TRITON_INTERPRET=1`). The ops underneath are registered as
`snce_fast::encode_topk`, `snce_fast::triton_sparse_decode` and
`snce_fast::triton_edit_residual` (`torch.library.triton_op`). See docs/kernels.md.
"""
from __future__ import annotations

import os
from typing import Any, Optional


def available() -> tuple[bool, str]:
    """(True, "") when triton imports and either CUDA or TRITON_INTERPRET=1 is there."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    import torch

    if torch.cuda.is_available():
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"


def _installed_namesake() -> Any:
    """The installed package of this top-level name (HF's `kernels`), found on sys.path outside this source
    tree, loaded and put in sys.modules in this module's place; None when there is none."""
    import importlib.machinery
    import importlib.util
    import sys

    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != tree]
    spec = importlib.machinery.PathFinder.find_spec(__name__, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module  # `import kernels` returns what sys.modules holds once this file has run
    spec.loader.exec_module(module)
    return module


_IMPORT_ERROR: Optional[Exception] = None
if __name__ != "snce_fast.kernels":
    # Imported as a top-level `kernels`: the source tree's root is on sys.path (`python -m pytest` or a
    # REPL there) and someone probed for a package of that name -- transformers does, for HF's `kernels`,
    # on import. Where HF's `kernels` is installed (transformers >= 5.25 requires it), the importer gets that
    # package instead of this module. Either way this module registers nothing: registering the ops again under
    # a second module would make torch destroy the first registrations while the real snce_fast.kernels still
    # calls them (a use-after-free: random crashes much later). Without HF's package it has no __version__
    # (transformers then treats it as absent).
    _installed_namesake()
    _IMPORT_ERROR = ImportError(f"the kernels were imported as {__name__!r}; import snce_fast.kernels")
else:
    from snce_fast.checks import check_activations, check_codes, check_k
    from snce_fast.ops import reference

    try:
        import torch

        from . import _cache
        from .encode_topk import candidate_keys, clear_bias_cache, encode_topk, folded_bias, tune  # noqa: F401
        from .encode_topk import check_select
        from .snce_edit import edit_residual, edit_residual_keys, edit_residual_threshold  # noqa: F401
        from .sparse_decode import sparse_decode  # noqa: F401
    except ImportError as _e:  # triton missing: available() reports it, the functions raise
        _IMPORT_ERROR = _e


def _need() -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"the Triton kernels cannot run: {_IMPORT_ERROR}")


def _rows(x: "torch.Tensor") -> "torch.Tensor":
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _encode32(x: "torch.Tensor", sae: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(fp32 ReLU'd values, int32 indices), each [M, k], for x [..., d]."""
    check_k(sae.k, sae.W_enc.shape[1])
    return encode_topk(_rows(x), sae.W_enc.detach(), folded_bias(sae), sae.k)


def _decoder_rows32(sae: Any, targets: list[int]) -> "torch.Tensor":
    """fp32 contiguous `W_dec[targets]` [T, d], gathered once per decoder tensor and version."""
    stored = getattr(sae, "W_dec_targets", None)
    source = stored if stored is not None else sae.W_dec
    key = ("decoder_rows32", tuple(targets), tuple(getattr(sae, "decoder_targets", None) or ()))
    return _cache.derived((source,), key, lambda: reference.decoder_rows(sae, targets).detach().float().contiguous())


def _allowed_mask(edit_mask: Optional["torch.Tensor"], lead: "torch.Size") -> Optional["torch.Tensor"]:
    """edit_mask as the edit kernels read it: None (every token), or a bool mask viewed as 2-D [R, L] over the
    tokens without a copy where its strides allow (the patch's BOS mask is a stride-0 expand)."""
    if edit_mask is None:
        return None
    m = torch.broadcast_to(edit_mask.to(torch.bool), lead)
    return m.reshape(1, -1) if m.dim() < 2 else m.reshape(-1, m.shape[-1])


def encode(x: "torch.Tensor", sae: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Fused TopK encode: x [..., d] -> (values [..., k] in x's dtype, indices [..., k] int32)."""
    _need()
    check_activations(x, sae.W_enc.shape[0])
    check_k(sae.k, sae.W_enc.shape[1])
    values, indices = encode_topk(_rows(x), sae.W_enc.detach(), folded_bias(sae), sae.k, True)  # 2 launches
    lead = x.shape[:-1]
    k = values.shape[-1]
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def decode(values: "torch.Tensor", indices: "torch.Tensor", sae: Any) -> "torch.Tensor":
    """Sparse decode `z @ W_dec + b_dec` (gather of k rows), output in values' dtype."""
    _need()
    check_codes(values, indices)
    lead, k = values.shape[:-1], values.shape[-1]
    v2 = values.reshape(-1, k)
    i2 = indices.reshape(-1, k)
    out = sparse_decode(v2 if v2.stride(-1) == 1 else v2.contiguous(), i2.contiguous(),
                        sae.W_dec.detach(), sae.b_dec.detach())
    return out.reshape(*lead, out.shape[-1])


def edit(
    x: "torch.Tensor",
    sae: Any,
    neurons: Any,
    scale: float = 0.0,
    clamp: Optional[float] = None,
    mode: str = "residual",
    gate: bool = False,
    min_tokens: int = 1,
    edit_mask: Optional["torch.Tensor"] = None,
    count_mask: Optional["torch.Tensor"] = None,
    threshold: Any = 0.0,
) -> "torch.Tensor":
    """Suppress the target latents in x [..., d]; same options and results as `snce_fast.reference.edit`."""
    _need()
    d = sae.W_enc.shape[0]
    targets = reference.check_edit_call(x, sae, neurons, scale, clamp, mode, gate, min_tokens)
    thr = reference.target_threshold_values(threshold, neurons, targets)
    if isinstance(thr, list):  # per neuron: made on the device once, not copied per call
        thr = _cache.constant(thr, torch.float32, x.device)
    check_activations(x, d)
    lead = x.shape[:-1]
    tgt = _cache.constant(targets, torch.int32, x.device)

    if mode == "residual" and not gate:  # the patch's call: encode kernel + fused merge/edit kernel, 2 launches
        check_k(sae.k, sae.W_enc.shape[1])
        x2 = _rows(x)
        args = (tgt, _decoder_rows32(sae, targets), _allowed_mask(edit_mask, lead), float(scale), clamp is not None,
                float(clamp) if clamp is not None else 0.0)
        if check_select() == "threshold":  # 3 launches: threshold, filter, select + edit
            out = edit_residual_threshold(x2, sae.W_enc.detach(), folded_bias(sae), sae.k, *args)
        else:
            out = edit_residual_keys(x2, candidate_keys(x2, sae.W_enc.detach(), folded_bias(sae), sae.k), sae.k, *args)
        return out.reshape(x.shape)

    values, indices = _encode32(x, sae)  # fp32 z (unrounded), int32
    z_t = reference.target_activations(values.reshape(*lead, -1), indices.reshape(*lead, -1), tgt)
    allowed = reference.allowed_tokens(z_t, lead, x.device, gate, min_tokens, thr, edit_mask, count_mask)
    allowed = torch.broadcast_to(allowed, lead).reshape(-1)

    if mode == "residual":
        w_t = _decoder_rows32(sae, targets)
        out = edit_residual(_rows(x), values, indices, tgt, w_t, allowed.to(torch.int8),
                            float(scale), clamp is not None, float(clamp) if clamp is not None else 0.0)
        return out.reshape(x.shape)

    reference._need_full_decoder(sae, "mode='reconstruct'")
    z_new = z_t.clamp(max=clamp) if clamp is not None else z_t * scale
    z_new = z_new.reshape(-1, len(targets))
    new_vals = reference.with_target_values(values, indices, tgt, z_new)
    recon = sparse_decode(new_vals, indices, sae.W_dec.detach(), sae.b_dec.detach()).to(x.dtype)
    x2 = x.reshape(-1, d)
    return torch.where(allowed.unsqueeze(-1), recon, x2).reshape(x.shape)


__all__ = ["available", "encode", "decode", "edit", "tune"]
