"""Quick start: patch a (tiny, random-weight) Stable Diffusion pipeline, check what SNCE
promises, and time the eager reference on this machine's CPU.

    python examples/quickstart.py [--quick]

Everything is offline: the pipeline is built from small configs with random weights.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import snce_fast
from snce_fast.ops import reference
from snce_fast.testing import random_sae, sd_pipeline

CONCEPT_PROMPT = "a painting of a nude woman by the river"
ORDINARY_PROMPT = "a photo of a red car in the city"


def token_hidden(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).last_hidden_state


def fired(sae, hidden) -> torch.Tensor:
    values, indices = reference.encode(hidden[0, 1:], sae)
    z = torch.zeros(hidden.shape[1] - 1, sae.n_latents).scatter(-1, indices.long(), values)
    return (z > 0).sum(0)  # tokens each latent fires on


def embeds(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def demo_patch() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pipe = sd_pipeline(tmp)
    sae = random_sae(d=32, n=512, k=4, seed=0)
    concept, ordinary = token_hidden(pipe, CONCEPT_PROMPT), token_hidden(pipe, ORDINARY_PROMPT)
    only_concept = fired(sae, concept) * (fired(sae, ordinary) == 0) * (fired(sae, token_hidden(pipe, "")) == 0)
    neuron = int(only_concept.argmax())
    print(f"latent {neuron} fires on {int(only_concept[neuron])} tokens of {CONCEPT_PROMPT!r} and never on {ORDINARY_PROMPT!r}")

    base_c, base_o = embeds(pipe, CONCEPT_PROMPT), embeds(pipe, ORDINARY_PROMPT)
    gen = lambda p: pipe(p, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    base_img = gen(ORDINARY_PROMPT)
    with snce_fast.patched(pipe, sae, neuron, scale=0.0):
        edit_c, edit_o = embeds(pipe, CONCEPT_PROMPT), embeds(pipe, ORDINARY_PROMPT)
        same_img = (gen(ORDINARY_PROMPT) == base_img).all()
    delta = (edit_c - base_c)[0]
    changed = int((delta.abs().sum(-1) > 0).sum())
    cos = torch.nn.functional.cosine_similarity(delta[delta.abs().sum(-1) > 0], sae.W_dec[neuron].detach()[None], dim=-1)
    ok = torch.equal(edit_o, base_o) and bool(same_img) and changed > 0 and bool((cos.abs() > 0.999).all())
    print(f"ordinary prompt: embeddings bit-identical = {torch.equal(edit_o, base_o)}, image bit-identical = {bool(same_img)}")
    print(f"concept prompt: {changed} token(s) changed, every change along W_dec[{neuron}] (|cos| min {cos.abs().min():.6f})")
    print(f"after unpatch, concept embeddings restored = {torch.equal(embeds(pipe, CONCEPT_PROMPT), base_c)}")
    if not ok:
        raise SystemExit("quickstart: the patch did not behave as SNCE promises")


def bench(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def microbenchmark(quick: bool) -> None:
    torch.manual_seed(0)
    n = 4096 if quick else 32768
    sae = random_sae(d=768, n=n, k=64, seed=1).requires_grad_(False)
    print(f"\nCPU timings (this machine's CPU, {torch.get_num_threads()} threads; GPU numbers need a GPU: "
          f"see benchmarks/), d=768 n={n} k=64, fp32, median ms:")
    print(f"{'prompts x 77':>13} {'ref encode':>11} {'ref edit':>9} {'ref decode':>11} {'C++ decode':>11}")
    for prompts in (1, 4) if quick else (1, 16):
        x = torch.randn(prompts * 77, 768)
        v, i = reference.encode(x, sae)
        r = 2 if quick else 5
        row = [bench(lambda: reference.encode(x, sae), r), bench(lambda: reference.edit(x, sae, [3]), r),
               bench(lambda: reference.decode(v, i, sae), r), bench(lambda: sae.decode(v, i), r)]
        print(f"{prompts:>13} " + " ".join(f"{t:>{w}.2f}" for t, w in zip(row, (11, 9, 11, 11))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (what CI runs)")
    args = parser.parse_args()
    from snce_fast.info import report

    print(report())
    demo_patch()
    microbenchmark(args.quick)


if __name__ == "__main__":
    main()
