"""Hook points: which tensor of a text encoder the SAE reads and edits (docs/api.md).

Modules are found by role, not by path, so transformers 4.x (`text_model.` nesting) and
5.x (flattened CLIPTextModel), CLIPTextModelWithProjection, BERT and T5 encoders all work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from snce_fast.checks import parse_hook


@dataclass(frozen=True)
class EncoderParts:
    """The modules of a transformer text encoder, found by role."""

    root: nn.Module  # the module called with input_ids
    layers: nn.ModuleList  # the encoder blocks, in order
    final_norm: Optional[nn.Module]  # CLIP/T5 final layer norm, None for BERT-style encoders
    width: int  # hidden size d


_LAYER_LIST_NAMES = ("layers", "layer", "block")
_FINAL_NORM_NAMES = ("final_layer_norm", "final_layernorm", "ln_final", "norm")


def find_parts(encoder: nn.Module) -> EncoderParts:
    """Locate the block list and final norm of a Hugging Face text encoder."""
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"expected a torch text-encoder module, got {type(encoder).__name__}")
    holder, layers = None, None
    for _, module in encoder.named_modules():
        for name in _LAYER_LIST_NAMES:
            child = getattr(module, name, None)
            if isinstance(child, nn.ModuleList) and len(child) > 0:
                holder, layers = module, child
                break
        if layers is not None:
            break
    if layers is None:
        raise TypeError(
            f"{type(encoder).__name__} has no encoder block list ('layers', 'layer' or 'block'): "
            "expected a CLIP, BERT or T5-style text encoder"
        )
    final_norm = None
    # the final norm sits beside the block holder (CLIP: text_model.final_layer_norm) or inside it (T5)
    for scope in _ancestors(encoder, holder):
        for name in _FINAL_NORM_NAMES:
            child = getattr(scope, name, None)
            if isinstance(child, nn.Module) and child is not holder:
                final_norm = child
                break
        if final_norm is not None:
            break
    return EncoderParts(root=encoder, layers=layers, final_norm=final_norm, width=_width(encoder, layers))


def _ancestors(root: nn.Module, target: nn.Module) -> list[nn.Module]:
    """target and its ancestors inside root, innermost first."""
    paths = {id(m): name for name, m in root.named_modules()}
    name = paths[id(target)]
    parts = name.split(".") if name else []
    chain = [root]
    for p in parts:
        chain.append(getattr(chain[-1], p))
    return chain[::-1]


def _width(encoder: nn.Module, layers: nn.ModuleList) -> int:
    cfg = getattr(encoder, "config", None)
    for attr in ("hidden_size", "d_model", "dim"):
        if cfg is not None and isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    for p in layers[0].parameters():
        return p.shape[-1]
    raise TypeError(f"cannot tell the hidden size of {type(encoder).__name__}")


def encoder_width(encoder: nn.Module) -> int:
    return find_parts(encoder).width


def resolve(encoder: nn.Module, hook: str, penultimate_output: bool = False) -> nn.Module:
    """The module whose forward output is the hook point's tensor.

    `"output"` is the tensor the pipeline consumes: the final layer norm's output for
    SD1.x/SD2 CLIP (and a BERT encoder's last block), or, when `penultimate_output` is set
    (SDXL reads `hidden_states[-2]`), the output of the second-to-last block.
    `"layer:N"` is the residual stream after block N (0-based; negative counts from the end).
    """
    hook = parse_hook(hook)
    parts = find_parts(encoder)
    if hook == "output":
        if penultimate_output:
            if len(parts.layers) < 2:
                raise ValueError("hidden_states[-2] needs an encoder with at least 2 blocks")
            return parts.layers[-2]
        return parts.final_norm if parts.final_norm is not None else parts.layers[-1]
    idx = int(hook.split(":")[1])
    n = len(parts.layers)
    if not -n <= idx < n:
        raise ValueError(f"hook {hook!r} is out of range: this encoder has {n} blocks (layer:0 .. layer:{n - 1})")
    return parts.layers[idx]


def hidden_states_index(encoder: nn.Module, hook: str, penultimate_output: bool = False) -> Optional[int]:
    """Index into `hidden_states` (embeddings first) that the hook point edits, or None for a final norm."""
    parts = find_parts(encoder)
    module = resolve(encoder, hook, penultimate_output)
    for i, layer in enumerate(parts.layers):
        if layer is module:
            return i + 1
    return None


def output_tensor(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (a tensor, or a tuple whose first item is)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hs = getattr(output, "last_hidden_state", None)
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError(f"cannot find a hidden-state tensor in a module output of type {type(output).__name__}")


def replace_output(output: Any, new: torch.Tensor) -> Any:
    """`output` with its hidden-state tensor replaced by `new` (same container type)."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    output.last_hidden_state = new
    return output


class _Stop(Exception):
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def run_to_hook(
    encoder: nn.Module,
    hook: str,
    call: Callable[[], Any],
    penultimate_output: bool = False,
) -> torch.Tensor:
    """Run `call()` (which runs the encoder) and return the hook point's tensor.

    Stops the forward pass right after the hook module, so later layers never run.
    """
    module = resolve(encoder, hook, penultimate_output)

    def grab(_mod, _inp, out):
        raise _Stop(output_tensor(out))

    handle = module.register_forward_hook(grab, prepend=True)
    try:
        call()
    except _Stop as stop:
        return stop.tensor
    finally:
        handle.remove()
    raise RuntimeError(f"the encoder ran without reaching hook point {hook!r}")
