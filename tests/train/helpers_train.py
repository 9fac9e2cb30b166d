"""Shared pieces of the snce_fast.train tests: a word list for tiny corpora, synthetic sparse
activations, and small training settings."""
from __future__ import annotations

import torch

from snce_fast.sae.model import SAE
from snce_fast.train import TrainConfig
from snce_fast.train.step import init_for_training

WORDS = (
    "a photo of the cat dog red blue green car tree house man woman sitting on table with "
    "in street park near big small old young two three riding horse bike water beach"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def tiny_bert(vocab_dir) -> tuple[torch.nn.Module, object]:
    """A random 2-layer BERT (d 32) and a BertTokenizer from `vocab_dir`/vocab.txt (no downloads)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    tok = BertTokenizer(str(vocab_dir / "vocab.txt"), model_max_length=16)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg).eval(), tok


def write_vocab(directory) -> None:
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")


def make_prompts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(3, 9, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (L,), generator=g)))
    return out


def synthetic(M: int, d: int = 32, n_true: int = 64, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Tokens that are sparse non-negative combinations of a hidden dictionary, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_true, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_true, generator=g)[:active] for _ in range(M)])
    z = torch.zeros(M, n_true).scatter_(1, idx, torch.rand(M, active, generator=g) * 2 + 0.5)
    return z @ D + 0.3


def small_cfg(**kw) -> TrainConfig:
    base = dict(n_latents=128, k=4, batch_size=64, warmup_steps=5, lr=3e-3, aux_k=16, dead_tokens=500,
                shuffle_buffer=128, prompt_batch_size=8, prompt_window=8, progress=False)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.validate()
    return cfg


def new_sae(d: int, cfg: TrainConfig, seed: int = 0) -> SAE:
    return init_for_training(SAE(d, cfg.n_latents, cfg.k), seed)
