"""CLIP score of an image against its prompt, as torchmetrics' CLIPScore and the erasure papers
compute it (docs/evaluation.md, "What is counted"). transformers is imported when a scorer is made."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch


def check_clip_dir(model_dir: Union[str, os.PathLike]) -> Path:
    """A local CLIPModel directory (it must hold config.json); raises FileNotFoundError naming it."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"CLIP model {str(d)!r} is not a directory")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"CLIP model {str(d)!r}: no config.json (expected a CLIPModel directory)")
    return d


class ClipScorer:
    """CLIP score of an image against its prompt: 100 * cosine(image, text) clamped at 0, from a
    local CLIPModel directory that also holds its processor files. Prompts longer than the text
    model's context are truncated."""

    def __init__(self, model_dir: Union[str, os.PathLike], device: Any = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        d = check_clip_dir(model_dir)
        try:
            self.model = CLIPModel.from_pretrained(d).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(d)
        except (OSError, ValueError) as e:
            raise ValueError(f"CLIP model {str(d)!r}: could not load: {str(e).splitlines()[0]}") from None
        self.device = torch.device(device)
        self.name = self.name_of(d)

    @staticmethod
    def name_of(model_dir: Union[str, os.PathLike]) -> str:
        """How a run's settings record the CLIP model: its resolved path."""
        return str(Path(model_dir).resolve())

    def __call__(self, image: Any, text: str) -> float:
        max_len = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(text=[text], images=[image.convert("RGB")], return_tensors="pt",
                                padding=True, truncation=True, max_length=max_len)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return float((100 * (img * txt).sum(-1)).clamp(min=0)[0])
