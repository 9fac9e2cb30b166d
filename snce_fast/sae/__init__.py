"""The sparse autoencoder: the module, its native file format, importers for SAEs trained by
other libraries, and the slim erasure artifact (docs/method.md, docs/formats.md)."""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch

import snce_fast.sae.hub as hub
from snce_fast.sae.erasure import ErasureSAE
from snce_fast.sae.files import CONFIG_FILE, ERASURE_FORMAT, SAEFormatError
from snce_fast.sae.model import SAE

__all__ = ["SAE", "ErasureSAE", "SAEFormatError", "load", "load_pretrained"]


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


def load_pretrained(repo_id_or_dir: Union[str, os.PathLike], subfolder: Optional[str] = None,
                    revision: Optional[str] = None, device: Optional[Union[str, torch.device]] = None,
                    cache_dir: Optional[str] = None) -> Union[SAE, ErasureSAE]:
    """A full SAE (any layout SAE.from_pretrained reads) or a slim erasure, from a local directory or a
    hub repo, whichever it holds."""
    path = hub.resolve(repo_id_or_dir, subfolder, revision, cache_dir)
    if hub.detect_layout(path) == "erasure":
        return ErasureSAE.load(path, device=device)
    return SAE.from_pretrained(path, device=device)
