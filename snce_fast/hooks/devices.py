"""The device an encoder computes on, also when it is offloaded (docs/api.md#offloading).

After `accelerate.cpu_offload(encoder)` (diffusers' `enable_sequential_cpu_offload`) the parameters sit on
the `meta` device between calls and accelerate's hooks bring them to the execution device for each
forward; after `enable_model_cpu_offload` they sit on the CPU until the encoder runs; with diffusers'
group offloading they are onloaded group by group. So the first parameter's device is no answer:
`execution_device` asks the offloading hooks first, as diffusers' own `_execution_device` does.
"""
from __future__ import annotations

import itertools
import sys
from typing import Any, Optional

import torch
from torch import nn


def _as_device(value: Any) -> Optional[torch.device]:
    if value is None:
        return None
    try:
        dev = torch.device(value)
    except (TypeError, RuntimeError, ValueError):
        return None
    return None if dev.type == "meta" else dev


def _accelerate_hooks(hook: Any) -> list[Any]:
    """An accelerate hook and, for a SequentialHook, the hooks it chains."""
    return [hook] + [h for inner in getattr(hook, "hooks", None) or () for h in _accelerate_hooks(inner)]


def accelerate_device(module: nn.Module) -> Optional[torch.device]:
    """The execution device named by an accelerate hook on `module` or a submodule (cpu_offload's
    AlignDevicesHook, cpu_offload_with_hook's CpuOffload), or None when there is none."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        if hook is None:
            continue
        for h in _accelerate_hooks(hook):
            dev = _as_device(getattr(h, "execution_device", None))
            if dev is not None:
                return dev
    return None


def group_offload_device(module: nn.Module) -> Optional[torch.device]:
    """The onload device of diffusers' group offloading on `module`, or None (diffusers is only asked
    when it is already imported: nothing else can have offloaded the module this way)."""
    go = sys.modules.get("diffusers.hooks.group_offloading")
    find = getattr(go, "_get_group_onload_device", None)
    if find is None:
        return None
    try:
        return _as_device(find(module))
    except (ValueError, AttributeError):
        return None


def execution_device(module: nn.Module, skip: Optional[nn.Module] = None) -> torch.device:
    """Where `module` computes: an offloading hook's execution device, else the device of its first
    tensor that is not on `meta` (tensors of `skip`, e.g. snce_fast's own patch state, are not asked),
    else the CPU."""
    dev = accelerate_device(module) or group_offload_device(module)
    if dev is not None:
        return dev
    skipped = {id(t) for t in itertools.chain(skip.parameters(), skip.buffers())} if skip is not None else set()
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in skipped and t.device.type != "meta":
            return t.device
    return torch.device("cpu")
