"""patch / unpatch: suppress SAE latents inside a pipeline's text encoder(s) (docs/method.md, docs/api.md).

A forward hook on the hook-point module of each text encoder edits the hidden state in
place of the original, so every caller (every `encode_prompt` copy in diffusers, modular
pipelines, `from_pipe` copies) sees the edit. State lives on the encoder module
(`encoder._snce_fast`) with the SAE tensors as non-persistent buffers, so `.to()` and
offloading move them and `save_pretrained` never writes them.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from snce_fast.checks import Neurons, as_neuron_list, check_edit_args, parse_hook, positive_int
from snce_fast.hooks.activations import counted_mask, eos_id
from snce_fast.hooks.compat import check_erasure_edit, check_sae_finite, check_sae_fits
from snce_fast.hooks.devices import execution_device
from snce_fast.hooks.points import find_parts, hidden_states_index, output_tensor, replace_output, resolve
from snce_fast.ops import backend, reference
from snce_fast.sae.erasure import ErasureSAE
from snce_fast.sae.model import SAE

STATE_ATTR = "_snce_fast"
SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline (SD1.x / SD2.x) and its img2img / inpaint / ControlNet variants",
    "StableDiffusionXLPipeline and its img2img / inpaint / ControlNet variants (one SAE per text encoder)",
    "a bare transformers text encoder (CLIPTextModel, CLIPTextModelWithProjection, BertModel, T5EncoderModel)",
)
_SDXL_ENCODERS = ("text_encoder", "text_encoder_2")


class _PatchState(nn.Module):
    """The edit applied by one encoder's hook; SAE tensors are non-persistent buffers."""

    def __init__(self, sae: Any, neurons: list[int], options: dict[str, Any], eos_token_id: Optional[int]):
        super().__init__()
        for name in ("W_enc", "b_enc", "b_dec"):
            self.register_buffer(name, getattr(sae, name).detach(), persistent=False)
        # the fused encode's b_enc - b_dec @ W_enc, made now so that a torch.compile'd encoder does not
        # fold it again per call (in eager mode the kernels re-fold when the SAE's weights change)
        self.register_buffer("b_enc_folded", reference.folded_encoder_bias(sae.W_enc, sae.b_enc, sae.b_dec),
                             persistent=False)
        if options["mode"] == "residual":
            # a residual edit decodes only the targets' rows: hold W_dec[T], not the [n, d] decoder
            self.register_buffer("W_dec_targets", reference.decoder_rows(sae, neurons).detach(), persistent=False)
            self.decoder_targets = list(neurons)
            self.W_dec = None
        else:
            self.register_buffer("W_dec", sae.W_dec.detach(), persistent=False)
        self.k = sae.k
        self.hook = sae.hook
        self.neurons = neurons
        self.options = options
        self.eos_token_id = eos_token_id
        self.input_ids: Optional[torch.Tensor] = None
        self.handles: list[Any] = []
        self.probe: Optional[torch.Tensor] = None  # set during the patch-time self-check
        self.bos_masks: dict[tuple[int, torch.device], torch.Tensor] = {}  # see `edit_positions`

    def extra_repr(self) -> str:
        return f"hook={self.hook!r}, neurons={self.neurons}, options={self.options}"

    def edit_positions(self, L: int, device: torch.device) -> torch.Tensor:
        """[L] bool, False at BOS (position 0, never edited), made once per (L, device) so that a patched call
        launches no kernel for it. Under torch.compile the graph makes it; during CUDA graph capture a miss is
        made by the graph and not stored (its memory is written only on replay). Entries are never evicted:
        a captured graph's pointer stays valid while the patch lives."""
        if torch.compiler.is_compiling():
            return torch.arange(L, device=device) >= 1
        key = (L, device)
        mask = self.bos_masks.get(key)
        if mask is None:
            with torch.inference_mode(False):  # a patch used in and out of inference_mode shares the mask
                mask = torch.arange(L, device=device) >= 1
            if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                self.bos_masks[key] = mask
        return mask

    def edit_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.W_enc.device != hidden.device:  # an offloaded encoder computes where its hooks put it
            self.to(hidden.device)
        if hidden.dim() != 3:
            return backend.edit(hidden, self, self.neurons, **self.options)
        B, L, _ = hidden.shape
        edit_mask = self.edit_positions(L, hidden.device).expand(B, L)  # a view: the edit kernel reads it in place
        ids = self.input_ids
        count = edit_mask
        gated = self.options["gate"] and ids is not None and ids.dim() == 2 and tuple(ids.shape) == (B, L)
        if gated and self.eos_token_id is not None:  # without an EOS id the counted tokens are the edit mask's
            count = counted_mask(ids.to(hidden.device), None, self.eos_token_id)  # only the gate counts tokens
        return backend.edit(hidden, self, self.neurons, edit_mask=edit_mask, count_mask=count, **self.options)


def _edit_hook(module: nn.Module, args: Any, output: Any, *, state: _PatchState) -> Any:
    hidden = output_tensor(output)
    if state.probe is not None:  # self-check: a recognisable change, recorded
        new = hidden + 1.0
        state.probe = new
        return replace_output(output, new)
    return replace_output(output, state.edit_hidden(hidden))


def _stash_ids(module: nn.Module, args: Any, kwargs: dict[str, Any], *, state: _PatchState) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    state.input_ids = ids if isinstance(ids, torch.Tensor) else None


def _clear_ids(module: nn.Module, args: Any, output: Any, *, state: _PatchState) -> None:
    state.input_ids = None


class PatchHandle:
    """Returned by `patch`; `remove()` (or leaving a `with` block) restores the pipeline."""

    def __init__(self, target: Any, encoders: dict[str, nn.Module]):
        self.target = target
        self.encoders = encoders

    @property
    def active(self) -> bool:
        return any(getattr(enc, STATE_ATTR, None) is not None for enc in self.encoders.values())

    def remove(self) -> None:
        for enc in self.encoders.values():
            _remove_state(enc)
        _unwrap_encode_prompt(self.target)

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PatchHandle(encoders={list(self.encoders)}, active={self.active})"


# -- discovery ---------------------------------------------------------------------------
def _is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "components") and not isinstance(obj, nn.Module)


def text_encoders(target: Any, penultimate_output: bool = False) -> dict[str, tuple[nn.Module, bool]]:
    """{name: (encoder, reads_penultimate)} for a supported pipeline or a bare encoder.
    `penultimate_output=True` says a bare encoder is read as SDXL reads it (hidden_states[-2]);
    a pipeline's own layout decides for pipelines."""
    if isinstance(target, nn.Module):
        find_parts(target)  # raises TypeError for modules that are not text encoders
        return {"encoder": (target, bool(penultimate_output))}
    name = type(target).__name__
    if not _is_pipeline(target) or not name.startswith("StableDiffusion") or name.startswith("StableDiffusion3"):
        raise TypeError(
            f"{name} is not supported by snce_fast.patch; supported: " + "; ".join(SUPPORTED_PIPELINES)
            + ". SD3 / FLUX condition mostly on T5, which has no hook points here yet."
        )
    xl = "XL" in name or getattr(target, "text_encoder_2", None) is not None
    found = {}
    for attr in _SDXL_ENCODERS if xl else ("text_encoder",):
        enc = getattr(target, attr, None)
        if enc is not None:
            found[attr] = (enc, xl)
    if not found:
        raise TypeError(f"{name} has no text encoder to patch")
    return found


def _per_encoder(value: Any, names: list[str], what: str, is_single) -> dict[str, Any]:
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{what} names encoder(s) {unknown}: this pipeline has {names}")
        return dict(value)
    if len(names) > 1 and what == "sae" and is_single(value):
        raise ValueError(
            f"this pipeline has {len(names)} text encoders {names}: pass one SAE per encoder, "
            f"e.g. sae={{'{names[0]}': sae1, '{names[1]}': sae2}}"
        )
    return {n: value for n in names}


# -- public API ---------------------------------------------------------------------------
def _plan_encoder(name: str, s: Any, encoder: tuple[nn.Module, bool], neuron_map: dict[str, Any], mode: str,
                  hook: Optional[str], threshold: Any) -> tuple:
    """Check one encoder's SAE, neurons and thresholds before anything is patched."""
    if not isinstance(s, (SAE, ErasureSAE)):
        raise TypeError(f"sae for {name!r} is a {type(s).__name__}: expected snce_fast.SAE or ErasureSAE")
    check_erasure_edit(s, mode, None, name)
    check_sae_finite(s, f"the SAE for {name!r}")
    enc, penultimate = encoder
    check_sae_fits(s, enc, penultimate)
    if hook is not None and parse_hook(hook) != s.hook:
        raise ValueError(f"hook={hook!r} does not match the hook the SAE for {name!r} was trained on ({s.hook!r})")
    if name not in neuron_map:
        raise ValueError(f"no neurons given for encoder {name!r}")
    targets = as_neuron_list(neuron_map[name], s.n_latents)
    thr = reference.target_threshold_values(threshold, neuron_map[name], targets)  # a float, or one per target
    check_erasure_edit(s, mode, targets, name)
    return name, enc, penultimate, s, targets, thr


def _install(enc: nn.Module, penultimate: bool, s: Any, targets: list[int], options: dict[str, Any],
             tokenizer: Any) -> "_PatchState":
    """Hook one encoder (replacing an earlier patch of it, never stacking)."""
    _remove_state(enc)
    state = _PatchState(s, targets, options, eos_id(enc, tokenizer))
    state.to(execution_device(enc))
    module = resolve(enc, s.hook, penultimate)
    state.handles = [
        enc.register_forward_pre_hook(functools.partial(_stash_ids, state=state), with_kwargs=True, prepend=True),
        enc.register_forward_hook(functools.partial(_clear_ids, state=state), always_call=True),
        module.register_forward_hook(functools.partial(_edit_hook, state=state), prepend=True),
    ]
    setattr(enc, STATE_ATTR, state)
    return state


def patch(
    pipe: Any,
    sae: Union[SAE, ErasureSAE, dict[str, Union[SAE, ErasureSAE]]],
    neurons: Union[Neurons, dict[str, Neurons], None] = None,
    scale: float = 0.0,
    mode: str = "residual",
    hook: Optional[str] = None,
    clamp: Optional[float] = None,
    gate: bool = False,
    min_tokens: int = 1,
    threshold: Union[float, Sequence[float]] = 0.0,
    self_check: bool = True,
    penultimate_output: bool = False,
) -> PatchHandle:
    """Edit the target SAE latents wherever the pipeline encodes a prompt.

    `pipe` is a StableDiffusion / StableDiffusionXL pipeline or a bare text encoder. For
    SDXL give `sae` (and optionally `neurons`) as a dict keyed by `text_encoder` /
    `text_encoder_2`; encoders left out are not patched. Patching an already patched
    pipeline replaces the earlier patch. See `snce_fast.reference.edit` for the rules.
    `sae` may be a slim `ErasureSAE` (residual mode; `neurons` defaults to its stored targets).
    `penultimate_output=True` patches a bare encoder where SDXL reads it (hook "output" = hidden_states[-2]).
    `threshold` (the gate's) is one float or one per neuron (in `neurons` order), e.g. from `calibrate`.
    A residual-mode patch holds only `W_dec[neurons]`, never the whole decoder.
    """
    check_edit_args(mode, scale, clamp)
    positive_int(min_tokens, "min_tokens")
    encoders = text_encoders(pipe, penultimate_output)
    names = list(encoders)
    saes = _per_encoder(sae, names, "sae", lambda v: isinstance(v, (SAE, ErasureSAE)))
    if neurons is None:
        slim = {name: s for name, s in saes.items() if isinstance(s, ErasureSAE)}
        if len(slim) != len(saes):
            raise ValueError("neurons is required (it defaults to the stored targets only for an ErasureSAE)")
        neurons = {name: s.decoder_targets for name, s in slim.items()}
    neuron_map = _per_encoder(neurons, list(saes), "neurons", lambda v: False)
    plan = [_plan_encoder(name, s, encoders[name], neuron_map, mode, hook, threshold) for name, s in saes.items()]
    options = dict(scale=scale, clamp=clamp, mode=mode, gate=gate, min_tokens=min_tokens)
    patched: dict[str, nn.Module] = {}
    for name, enc, penultimate, s, targets, thr in plan:
        state = _install(enc, penultimate, s, targets, {**options, "threshold": thr}, getattr(pipe, "tokenizer", None))
        patched[name] = enc
        if self_check:
            try:
                _self_check(enc, state, penultimate)
            except Exception:
                for other in patched.values():
                    _remove_state(other)
                raise
    if _is_pipeline(pipe):
        _wrap_encode_prompt(pipe)
    return PatchHandle(pipe, patched)


def unpatch(pipe: Any) -> None:
    """Remove every snce_fast patch from `pipe` (a pipeline or an encoder); a no-op if none."""
    if not isinstance(pipe, nn.Module) and not _is_pipeline(pipe):
        raise TypeError(f"unpatch takes a diffusers pipeline or a text encoder, got {type(pipe).__name__} {pipe!r:.60}")
    try:
        encoders = text_encoders(pipe)
    except TypeError:
        return
    for enc, _ in encoders.values():
        _remove_state(enc)
    _unwrap_encode_prompt(pipe)


def is_patched(pipe: Any) -> bool:
    try:
        encoders = text_encoders(pipe)
    except TypeError:
        return False
    return any(getattr(enc, STATE_ATTR, None) is not None for enc, _ in encoders.values())


@contextlib.contextmanager
def patched(pipe: Any, sae: Any, neurons: Any = None, **kwargs: Any) -> Iterator[PatchHandle]:
    """`with snce_fast.patched(pipe, sae, neurons): ...` patches for the block only."""
    handle = patch(pipe, sae, neurons, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()


# -- internals -------------------------------------------------------------------------------
def _remove_state(enc: nn.Module) -> None:
    state = getattr(enc, STATE_ATTR, None)
    if state is None:
        return
    for h in state.handles:
        h.remove()
    delattr(enc, STATE_ATTR)


def _self_check(enc: nn.Module, state: _PatchState, penultimate: bool) -> None:
    """Check that an edit at a block output reaches `hidden_states[i]`, where SDXL reads it.

    transformers has collected hidden_states by a loop, by patched forwards and by lazily
    installed hooks; in one range a forward hook changes the downstream tensors but not
    the recorded hidden_states. Fail loudly rather than erase silently in the wrong place.
    """
    idx = hidden_states_index(enc, state.hook, penultimate)
    if idx is None:
        return
    cfg = getattr(enc, "config", None)
    vocab = int(getattr(cfg, "vocab_size", 2) or 2)
    ids = torch.tensor([[0, 1 % vocab, 2 % vocab, 3 % vocab]], device=execution_device(enc, skip=state))
    state.probe = torch.empty(0)
    try:
        with torch.no_grad():
            out = enc(input_ids=ids, output_hidden_states=True)
        recorded = out.hidden_states[idx]
        seen = state.probe
    finally:
        state.probe = None
    if seen.numel() == 0:
        raise RuntimeError(f"snce_fast self-check: the hook on {state.hook!r} never ran")
    if not torch.equal(recorded, seen):
        raise RuntimeError(
            f"snce_fast self-check failed: the edit at {state.hook!r} does not reach hidden_states[{idx}] "
            "with this transformers version; the pipeline would read an unedited tensor. Please report it."
        )


def _wrap_encode_prompt(pipe: Any) -> None:
    original = getattr(type(pipe), "encode_prompt", None)
    if original is None or "encode_prompt" in vars(pipe):
        return
    bound = original.__get__(pipe, type(pipe))

    @functools.wraps(original)
    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("prompt_embeds") is not None and is_patched(pipe):
            warnings.warn(
                "prompt_embeds were passed directly: they bypass the text encoder, so the snce_fast patch "
                "cannot edit them. Pass the prompt text instead to apply the concept erasure.",
                UserWarning,
                stacklevel=3,
            )
        return bound(*args, **kwargs)

    encode_prompt._snce_fast_wrapper = True  # type: ignore[attr-defined]
    pipe.encode_prompt = encode_prompt
    _watch_siblings(pipe)


def _watch_siblings(pipe: Any) -> None:
    """Make pipelines built later around a patched encoder warn too: `from_pipe`, AutoPipeline's
    `from_pipe` and `Cls(**pipe.components)` all register their components through
    `DiffusionPipeline.register_modules`, which is wrapped once (per process) to give such a pipeline
    the same `encode_prompt` wrapper. Pipelines that hold no patched encoder are left as they are."""
    base = next((c for c in type(pipe).__mro__ if c.__name__ == "DiffusionPipeline"), None)
    original = getattr(base, "register_modules", None)
    if original is None or getattr(original, "_snce_fast_wrapper", False):
        return

    @functools.wraps(original)
    def register_modules(self: Any, **kwargs: Any) -> None:
        original(self, **kwargs)
        if any(getattr(m, STATE_ATTR, None) is not None for m in kwargs.values() if isinstance(m, nn.Module)):
            _wrap_encode_prompt(self)

    register_modules._snce_fast_wrapper = True  # type: ignore[attr-defined]
    base.register_modules = register_modules


def _unwrap_encode_prompt(pipe: Any) -> None:
    if not _is_pipeline(pipe) or is_patched(pipe):
        return
    fn = vars(pipe).get("encode_prompt")
    if fn is not None and getattr(fn, "_snce_fast_wrapper", False):
        del pipe.encode_prompt
