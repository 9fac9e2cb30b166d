"""A tiny BERT whose output carries a planted concept direction, and an SAE whose latent PLANTED reads
exactly that direction (tests of snce_fast.evaluation.efficacy and `snce-fast efficacy`).

Concept prompts hold CONCEPT_WORD, ordinary ones TWIN_WORD at the same kind of place; the two words
share one input embedding, so the encoder output differs only by ALPHA * u on the concept token."""
from __future__ import annotations

import torch

from snce_fast.sae.model import SAE
from snce_fast.testing import bert_model, write_bert_tokenizer

PLANTED, WRONG, ALPHA = 5, 9, 12.0
CONCEPT_WORD, TWIN_WORD = "nude", "woman"
POOL = ["red", "blue", "green", "car", "tree", "house", "river", "boat", "sky", "night", "street", "city"]


def prompts(n: int, seed: int, concept: bool) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out: list[str] = []
    while len(out) < n:
        k = int(torch.randint(3, 7, (1,), generator=g))
        words = [POOL[int(j)] for j in torch.randint(len(POOL), (k,), generator=g)]
        words.insert(int(torch.randint(k + 1, (1,), generator=g)), CONCEPT_WORD if concept else TWIN_WORD)
        p = " ".join(words)
        if p not in out:
            out.append(p)
    return out


def planted_encoder(tmp_path):
    """(encoder, tokenizer, u): the tiny BERT's output gets ALPHA * u added on every CONCEPT_WORD token."""
    tok = write_bert_tokenizer(tmp_path / "tok")
    enc = bert_model(tok, hidden=32, layers=2, seed=0)
    cid, tid = tok.convert_tokens_to_ids([CONCEPT_WORD, TWIN_WORD])
    with torch.no_grad():
        emb = enc.embeddings.word_embeddings.weight
        emb[cid] = emb[tid]
    u = torch.randn(32, generator=torch.Generator().manual_seed(1))
    u /= u.norm()
    ids: dict = {}

    def stash(mod, args, kwargs):
        ids["x"] = kwargs.get("input_ids", args[0] if args else None)

    def plant(mod, inp, out):
        return out + ALPHA * (ids["x"] == cid).unsqueeze(-1).to(out.dtype) * u

    enc.register_forward_pre_hook(stash, with_kwargs=True)
    enc.encoder.layer[-1].output.register_forward_hook(plant)
    return enc, tok, u


def planted_sae(u: torch.Tensor, n: int = 16, k: int = 2) -> SAE:
    """Latent PLANTED reads and writes u and is in a token's top k only where the planted direction
    is; the other latents are random directions with a large bias (they fill the top k elsewhere)."""
    sae = SAE.random(u.numel(), n, k, seed=0, hook="output")
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.fill_(5.0)
        sae.W_enc[:, PLANTED] = u
        sae.W_dec[PLANTED] = u
        sae.b_enc[PLANTED] = 0.0
    return sae
