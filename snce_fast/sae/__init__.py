"""The sparse autoencoder: the module, its native file format, importers for SAEs trained by
other libraries, and the slim erasure artifact (docs/method.md, docs/formats.md)."""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch

from snce_fast.sae.erasure import ErasureSAE
from snce_fast.sae.files import CONFIG_FILE, ERASURE_FORMAT, SAEFormatError
from snce_fast.sae.model import SAE

__all__ = ["SAE", "ErasureSAE", "SAEFormatError", "load"]


def load(path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None) -> Union[SAE, ErasureSAE]:
    """A saved full SAE or slim erasure, whichever directory `path` holds (its config.json says)."""
    cfg_file = os.path.join(path, CONFIG_FILE)
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        cfg = {}
    if isinstance(cfg, dict) and cfg.get("format") == ERASURE_FORMAT:
        return ErasureSAE.load(path, device=device)
    return SAE.load(path, device=device)
