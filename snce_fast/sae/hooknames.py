"""Foreign hook names -> snce_fast hook points ("output" / "layer:N", snce_fast.hooks.points), and back.

snce_fast hooks the output of an encoder block (`layer:N`, the residual stream after block N) or the
tensor the pipeline reads (`output`: the final layer norm's output, or the last block's). A name that
denotes anything else (an MLP output, attention heads, the embeddings) is refused: editing a
different tensor than the one the SAE was trained on would erase nothing, or the wrong thing.
"""
from __future__ import annotations

import re
from typing import Optional

from snce_fast.sae.files import SAEFormatError

# a module path that ends at an encoder block: CLIP/GPT "layers.N", BERT "layer.N", T5 "block.N",
# TransformerLens "blocks.N", GPT-2 "h.N"
_BLOCK = r"(?:layers|layer|block|blocks|h)\.(\d+)"
_BLOCK_OUTPUT = re.compile(rf"^(?:.*\.)?{_BLOCK}$")
_INSIDE_BLOCK = re.compile(rf"(?:^|\.){_BLOCK}\.")
_FINAL_NORM = re.compile(r"^(?:.*\.)?(?:final_layer_norm|final_layernorm|ln_final)$")
# TransformerLens names that SAELens writes for models run through TransformerLens
_TL_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")

SUPPORTED = ("blocks.N.hook_resid_post (-> layer:N), blocks.N.hook_resid_pre with N >= 1 (-> layer:N-1), "
             "a module path ending at a block such as text_model.encoder.layers.N (-> layer:N), "
             "or one ending at the final layer norm (-> output)")


def module_hook(name: str) -> Optional[str]:
    """The hook point of a Hugging Face module path whose output the SAE read, or None when the path
    is not a block or the final norm (e.g. `...layers.3.mlp`, or a folder name that is no module)."""
    m = _BLOCK_OUTPUT.match(name)
    if m:
        return f"layer:{int(m.group(1))}"
    if _FINAL_NORM.match(name):
        return "output"
    return None


def inside_block(name: str) -> bool:
    """Whether `name` is the path of a module inside an encoder block (an MLP, attention, a norm)."""
    return bool(_INSIDE_BLOCK.search(name))


def saelens_hook(name: str, where: str) -> str:
    """The hook point of a SAELens `hook_name` (TransformerLens names, or a Hugging Face module path
    for SAEs trained on a transformers model). `where` names the file and field for errors."""
    m = _TL_RESID.match(name)
    if m:
        block, which = int(m.group(1)), m.group(2)
        if which == "post":
            return f"layer:{block}"
        if block == 0:
            raise SAEFormatError(f"{where}={name!r} is the embeddings' output (the residual stream entering "
                                 "block 0), which is not a hook point snce_fast can patch; it supports " + SUPPORTED)
        return f"layer:{block - 1}"  # the residual stream entering block N is block N-1's output
    hook = module_hook(name)
    if hook is None:
        raise SAEFormatError(f"{where}={name!r} is not a residual-stream tensor snce_fast can patch: it supports "
                             f"{SUPPORTED}. Pass hook= only if the SAE really reads one of those tensors")
    return hook


def saelens_name(hook: str) -> Optional[str]:
    """The TransformerLens hook name of an snce_fast hook point, when there is one: `layer:N` (N >= 0)
    is `blocks.N.hook_resid_post`; `output` and negative layers have none."""
    m = re.fullmatch(r"layer:(\d+)", hook)
    return f"blocks.{m.group(1)}.hook_resid_post" if m else None
