"""Prompts -> token activations at a hook point, shared by patch self-checks, detect,
scan and training, so all of them see exactly the tensor the pipeline consumes."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from snce_fast.hooks.devices import execution_device
from snce_fast.hooks.points import run_to_hook

# CLIP text encoders in SD pipelines run without an attention mask (causal attention only);
# feeding one would change the padding positions the UNet reads.
_NO_MASK_MODEL_TYPES = ("clip_text_model", "clip")


# tokenizers without a length limit report a huge sentinel (transformers' VERY_LARGE_INTEGER) instead
_NO_LIMIT = 10**9


def tokenizer_limit(tokenizer: Any) -> Optional[int]:
    """The tokenizer's `model_max_length`, or None when it has none (missing or the huge sentinel)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None


def encoder_positions(encoder: Any) -> Optional[int]:
    """How many token positions the encoder can read (`config.max_position_embeddings`), or None when its
    config does not say (e.g. relative position encodings)."""
    n = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _check_length_value(max_length: Any) -> None:
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length={max_length!r} is invalid: expected a positive int (or None: the tokenizer's)")


def check_length_limits(max_length: Optional[int], positions: Optional[int], tokenizer_max: Optional[int],
                        encoder_name: str = "the encoder") -> None:
    """`max_length` (None: the tokenizer's default, nothing to check here) against an encoder's number of
    positions and its tokenizer's `model_max_length` (None: not known), e.g. as read from a model's config
    files before any weights are loaded. ValueError naming both numbers."""
    _check_length_value(max_length)
    if max_length is not None:
        _refuse_longer(max_length, positions, tokenizer_max, encoder_name, "max_length")


def check_max_length(encoder: Any, tokenizer: Any, max_length: Optional[int]) -> int:
    """The padding length prompts will get (`max_length`, or the tokenizer's default), checked against
    the encoder's position limit and the tokenizer's `model_max_length`: a longer one would crash the
    encoder mid-run (or read position embeddings that do not exist). ValueError naming both numbers."""
    _check_length_value(max_length)
    length = max_length or default_length(tokenizer)
    _refuse_longer(length, encoder_positions(encoder), tokenizer_limit(tokenizer), type(encoder).__name__,
                   "max_length" if max_length else "the default padding length")
    return length


def _refuse_longer(length: int, positions: Optional[int], tokenizer_max: Optional[int], encoder_name: str,
                   what: str) -> None:
    limits = [n for n in (positions, tokenizer_max) if n is not None]
    if limits and length > min(limits):
        raise ValueError(
            f"{what}={length} is longer than the encoder can read: {encoder_name} has "
            f"{positions if positions is not None else 'no stated number of'} positions (max_position_embeddings) "
            f"and its tokenizer's model_max_length is {tokenizer_max if tokenizer_max is not None else 'not set'}: "
            f"expected max_length <= {min(limits)}")


def default_length(tokenizer: Any) -> int:
    """The padding length when none is given: the tokenizer's limit (77 for CLIP); 512 when it has none
    or one above 4096."""
    limit = getattr(tokenizer, "model_max_length", 77)
    return 512 if not isinstance(limit, int) or not 0 < limit <= 4096 else limit


# Corpus passes (scan, detect, calibrate, top prompts, training on counted tokens) pad each batch to
# its longest prompt instead of the tokenizer's limit: the tokens they count (1..EOS) are the same,
# since CLIP attends causally and masked encoders (BERT, T5) ignore padding, and a caption-length
# batch is 4x (CLIP, 77) to 40x (MiniLM, 512) cheaper. The patch at generation time never tokenizes:
# the pipeline keeps its own padding. False restores full padding everywhere (for comparisons).
CORPUS_PAD_TO_LONGEST = True


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: Optional[int] = None,
             pad_to_longest: bool = False) -> dict[str, torch.Tensor]:
    """Tokenize like the SD pipelines do: pad to the tokenizer's max length (77 for CLIP), truncate.
    `pad_to_longest`: pad only to the batch's longest prompt (still truncated at that length); corpus
    passes use `corpus_tokenize`. A `max_length` above the tokenizer's `model_max_length` is refused
    (ValueError naming both)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    _check_length_value(max_length)
    tok_limit = tokenizer_limit(tokenizer)
    if max_length is not None and tok_limit is not None and max_length > tok_limit:
        raise ValueError(f"max_length={max_length} is more than the tokenizer's model_max_length {tok_limit}: "
                         f"expected max_length <= {tok_limit}")
    limit = max_length or default_length(tokenizer)
    return tokenizer(
        list(prompts), padding="longest" if pad_to_longest else "max_length", max_length=limit, truncation=True,
        return_tensors="pt",
    )


def corpus_tokenize(tokenizer: Any, prompts: Sequence[str], max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """`tokenize` for passes over prompt corpora that read only counted tokens (1..EOS): padded to the
    batch's longest prompt (CORPUS_PAD_TO_LONGEST)."""
    return tokenize(tokenizer, prompts, max_length, pad_to_longest=CORPUS_PAD_TO_LONGEST)


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
    """Where `encoder` computes, also when it is offloaded (`snce_fast.hooks.devices.execution_device`)."""
    return execution_device(encoder)


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
    positions = encoder_positions(encoder)
    if positions is not None and ids.shape[-1] > positions:
        raise ValueError(f"prompts padded to {ids.shape[-1]} tokens are longer than the encoder can read: "
                         f"{type(encoder).__name__} has {positions} positions (max_position_embeddings); "
                         "pass max_length <= " + str(positions))
    kwargs: dict[str, Any] = {"input_ids": ids}
    if uses_attention_mask(encoder) and "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"].to(dev)
    return run_to_hook(encoder, hook, lambda: encoder(**kwargs), penultimate_output)
