"""A victim on the planted tiny BERT (tests/evaluation/helpers_efficacy.py): the fixed reader is trained on
concept (CONCEPT_WORD) vs ordinary prompts; the SNCE defence gates on the planted latent."""
from __future__ import annotations

import torch

from helpers_efficacy import PLANTED, planted_encoder, planted_sae, prompts
from snce_fast.attack import Victim, snce_defence, vocabulary
from snce_fast.evaluation import efficacy
from snce_fast.evaluation.probes import fit_probe, mean_pool

GATE_THRESHOLD = 0.5


def build(tmp_path):
    enc, tok, u = planted_encoder(tmp_path)
    sae = planted_sae(u)
    concept, ordinary = prompts(80, 0, True), prompts(80, 1, False)
    emb = efficacy.embed_tokens(enc, concept + ordinary, tok)

    def pooled(ps):
        return torch.cat([mean_pool(x, c) for x, c in efficacy._batches(emb, ps, 64)])

    reader = fit_probe(pooled(concept[:40]), pooled(ordinary[:40]))
    reader.fix_threshold(pooled(ordinary[:40]), 0.05)
    victim = Victim(enc, tok, reader)
    defence = snce_defence("snce", sae, [PLANTED], [GATE_THRESHOLD])
    return {"enc": enc, "tok": tok, "sae": sae, "victim": victim, "defended": victim.with_defence(defence),
            "concept": concept, "ordinary": ordinary, "vocab": vocabulary(tok), "reader": reader}
