"""Prompts -> token activations at a hook point, shared by patch self-checks, detect,
scan and training, so all of them see exactly the tensor the pipeline consumes."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from snce_fast.hooks.points import run_to_hook

# CLIP text encoders in SD pipelines run without an attention mask (causal attention only);
# feeding one would change the padding positions the UNet reads.
_NO_MASK_MODEL_TYPES = ("clip_text_model", "clip")


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Tokenize like the SD pipelines do: pad to the tokenizer's max length (77 for CLIP), truncate."""
    if isinstance(prompts, str):
        prompts = [prompts]
    limit = max_length or getattr(tokenizer, "model_max_length", 77)
    if limit is None or limit > 4096:  # tokenizers without a limit report a huge sentinel
        limit = 512
    return tokenizer(
        list(prompts), padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
    )


def counted_mask(
    input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, eos_token_id: Optional[int] = None
) -> torch.Tensor:
    """Tokens that count for frequencies and the gate: positions 1..EOS (BOS and padding excluded).

    With an attention mask, padding is where it is 0; otherwise it is everything after the
    first EOS (CLIP's pad token may equal its EOS token).
    """
    B, L = input_ids.shape
    pos = torch.arange(L, device=input_ids.device).expand(B, L)
    if attention_mask is not None:
        return attention_mask.to(torch.bool) & (pos >= 1)
    if eos_token_id is None:
        return pos >= 1
    is_eos = input_ids == eos_token_id
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), torch.full_like(pos[:, 0], L - 1))
    return (pos >= 1) & (pos <= first[:, None])


def eos_id(encoder: nn.Module, tokenizer: Any = None) -> Optional[int]:
    tid = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tid is None:
        tid = getattr(getattr(encoder, "config", None), "eos_token_id", None)
    return tid if isinstance(tid, int) else None


def uses_attention_mask(encoder: nn.Module) -> bool:
    return getattr(getattr(encoder, "config", None), "model_type", "") not in _NO_MASK_MODEL_TYPES


def encoder_device(encoder: nn.Module) -> torch.device:
    for p in encoder.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def hook_activations(
    encoder: nn.Module,
    batch: dict[str, torch.Tensor],
    hook: str,
    penultimate_output: bool = False,
) -> torch.Tensor:
    """Run `encoder` on a tokenized batch up to the hook point; returns [B, L, d]."""
    dev = encoder_device(encoder)
    ids = batch["input_ids"].to(dev)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if uses_attention_mask(encoder) and "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"].to(dev)
    return run_to_hook(encoder, hook, lambda: encoder(**kwargs), penultimate_output)
