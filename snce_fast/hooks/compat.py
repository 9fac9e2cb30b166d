"""Does an SAE fit a text encoder, and an edit? Checks that need only the SAE and the encoder
module (no prompts, no pipeline run), so callers can make them before any heavy work."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from snce_fast.checks import check_finite
from snce_fast.hooks.points import encoder_width, resolve
from snce_fast.ops import reference
from snce_fast.sae.erasure import ErasureSAE


def check_sae_fits(sae: Any, encoder: nn.Module, penultimate_output: bool = False) -> None:
    """ValueError when the SAE's width (d_in) or hook point does not fit `encoder` (as read with
    `penultimate_output`, SDXL's hidden_states[-2])."""
    width = encoder_width(encoder)
    if width != sae.d_in:
        raise ValueError(f"the SAE has d_in={sae.d_in} but the encoder ({type(encoder).__name__}) has width {width}: "
                         "expected an SAE trained on this encoder")
    try:
        resolve(encoder, sae.hook, penultimate_output)
    except ValueError as e:
        raise ValueError(f"the SAE's hook {sae.hook!r} does not fit the encoder "
                         f"({type(encoder).__name__}): {e}") from None


def check_sae_finite(sae: Any, what: str = "the SAE") -> None:
    """ValueError naming the tensor when an SAE's (or a slim erasure's) weights hold NaN or inf, e.g.
    after an in-memory edit: such an SAE would silently make codes and edits NaN or wrong."""
    names = ("W_enc", "b_enc", "b_dec", "W_dec_targets" if isinstance(sae, ErasureSAE) else "W_dec")
    check_finite({name: getattr(sae, name) for name in names}, what)


def check_erasure_edit(sae: Any, mode: str, neurons: Optional[Sequence[int]] = None,
                       name: str = "text_encoder") -> None:
    """A slim erasure (ErasureSAE) edits in residual mode only, and only the latents whose decoder rows
    it stores; a full SAE passes. `name`: the encoder the SAE is for (for the message)."""
    if not isinstance(sae, ErasureSAE):
        return
    if mode != "residual":
        raise ValueError(f"mode {mode!r} needs the whole decoder, but the SAE for {name} is a slim erasure (it keeps "
                         "only the target rows): use residual mode or the full SAE")
    if neurons:
        try:
            reference.decoder_rows(sae, [int(j) for j in neurons])
        except ValueError as e:
            raise ValueError(f"{e} (the slim erasure for {name})") from None
