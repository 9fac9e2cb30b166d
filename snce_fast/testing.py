"""Tiny random-weight text encoders, tokenizers and SD / SDXL pipelines (no downloads).

Used by the tests, the quick-start and the benchmarks; diffusers is only imported by the
pipeline builders."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from snce_fast.sae import SAE

WORDS = (
    "a photo of the cat dog man woman nude naked painting portrait street city red blue green "
    "car tree house on in with and by art style van gogh river boat sky night"
).split()


def write_clip_tokenizer(directory: str | Path, model_max_length: int = 77):
    """A real CLIPTokenizer over a tiny BPE vocab (characters + whole-word merges)."""
    from transformers import CLIPTokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase) + list("0123456789.,!'-")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=model_max_length)


def clip_config(tokenizer, hidden: int = 32, layers: int = 3, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def clip_text_model(tokenizer, hidden: int = 32, layers: int = 3, seed: int = 0, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(clip_config(tokenizer, hidden, layers)).eval()


def _unet(cross_attention_dim: int, xl: bool):
    from diffusers import UNet2DConditionModel

    kw = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
        attention_head_dim=(2, 4),
    )
    if xl:
        kw.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text_embeds (32) + 6 time ids x 8
            use_linear_projection=True,
        )
    return UNet2DConditionModel(**kw)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def sd_pipeline(tmp_path: str | Path, seed: int = 0):
    """A StableDiffusionPipeline with random weights: CLIP width 32, 3 layers, 16x16 images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = write_clip_tokenizer(Path(tmp_path) / "tok")
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=clip_text_model(tok, seed=seed),
        tokenizer=tok,
        unet=_unet(32, xl=False),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(tmp_path: str | Path, seed: int = 0):
    """A StableDiffusionXLPipeline with random weights: two CLIP encoders of width 32."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok = write_clip_tokenizer(Path(tmp_path) / "tok")
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=clip_text_model(tok, seed=seed),
        text_encoder_2=clip_text_model(tok, seed=seed + 1, with_projection=True),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=_unet(64, xl=True),
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_sae(d: int, n: int = 64, k: int = 4, seed: int = 0, hook: str = "output"):
    """A small seeded random SAE (snce_fast.SAE.random)."""
    return SAE.random(d, n, k, seed=seed, hook=hook)


def write_bert_tokenizer(directory: str | Path):
    from transformers import BertTokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + list(string.ascii_lowercase)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(d / "vocab.txt"), model_max_length=24)


def bert_model(tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=tokenizer.model_max_length,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def save_bert_dir(directory: str | Path, seed: int = 0):
    """A tiny BERT (with its pooler, so it loads without warnings) and its tokenizer saved as a
    transformers model directory, as `--model DIR` reads it; returns the tokenizer."""
    from transformers import BertModel

    tok = write_bert_tokenizer(directory)
    # the weights are drawn right after bert_model(tok, seed) seeds torch and builds its own copy
    BertModel(bert_model(tok, seed=seed).config).eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return tok
