"""The corpus passes (scan, detect, calibrate, SAE training) timed side by side with what a user would run
instead, on the same prompts in one process (docs/performance.md, "Corpus passes"). Used by
`snce-fast bench --passes` and benchmarks/bench_corpus.py.

scan rows:
  snce_fast           `scan` with its defaults (length-sorted windows, token-budget batches, tokenization
                      on a background thread, the encoder stopped at the hook point)
  snce_unbucketed     the same with bucketing off (consecutive batches padded to their longest prompt)
  hf_loop_longest     the plain Hugging Face loop: tokenizer(padding="longest") -> encoder(...,
                      output_hidden_states=True) -> eager SAE encode (matmul + torch.topk) -> torch.bincount
  hf_loop_max_length  the same loop padded to the tokenizer's limit, as the SD pipelines tokenize
Every scan row's counters are compared with snce_fast's (`counters_differing_from_snce_fast`).

train rows: this package's training step, EleutherAI's `eai-sparsify` SparseCoder (its forward, backward,
decoder-gradient projection and unit-norm step, torch Adam as its `optimizer="adam"`) and SAELens's
TopKTrainingSAE (`training_forward_pass`, backward, clip_grad_norm_(1.0), Adam, as its SAETrainer), on the
same activations with the same n, k, batch, learning rate and steps; FVU on held-out activations after.
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from snce_fast.hooks import batching
from snce_fast.hooks.activations import default_length, eos_id, hook_activations
from snce_fast.sae.model import SAE
from snce_fast.train import SAETrainer, TrainConfig
from snce_fast.train.step import init_for_training
from snce_fast.workflow.calibrate import CalibrationWarning, calibrate
from snce_fast.workflow.detect import detect
from snce_fast.workflow.scan import scan

PASSES = ("scan", "detect", "calibrate", "train")
Row = dict[str, Any]


def timed(fn: Callable[[], Any], cuda: bool = False) -> tuple[Any, float]:
    """(fn(), seconds), synchronising CUDA around it when `cuda`."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def with_bucketing(on: bool, fn: Callable[[], Any]) -> Any:
    """fn() with length bucketing on or off (`snce_fast.hooks.batching.BUCKETING`)."""
    old = batching.BUCKETING
    batching.BUCKETING = on
    try:
        return fn()
    finally:
        batching.BUCKETING = old


@torch.no_grad()
def hf_loop(enc: Any, tok: Any, sae: SAE, prompts: Sequence[str], batch: int,
            padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What a user writes without this package: (prompts_fired, tokens_fired) int64 [n] over counted
    tokens (1..EOS; BOS and padding out), the SAE's hook being the encoder's output."""
    dev, n = sae.W_enc.device, sae.n_latents
    prompts_fired = torch.zeros(n, dtype=torch.int64, device=dev)
    tokens_fired = torch.zeros(n, dtype=torch.int64, device=dev)
    clip = getattr(enc.config, "model_type", "") in ("clip_text_model", "clip")
    for s in range(0, len(prompts), batch):
        t = tok(list(prompts[s : s + batch]), padding=padding, max_length=default_length(tok), truncation=True,
                return_tensors="pt").to(dev)
        kw = {} if clip else {"attention_mask": t["attention_mask"]}
        h = enc(input_ids=t["input_ids"], output_hidden_states=True, **kw).last_hidden_state
        top = ((h.to(sae.W_enc.dtype) - sae.b_dec) @ sae.W_enc + sae.b_enc).topk(sae.k, dim=-1)
        if clip:  # CLIP's pad token may be its EOS: count up to the first EOS
            is_eos = t["input_ids"] == tok.eos_token_id
            counted = torch.arange(h.shape[1], device=dev) <= is_eos.int().argmax(-1, keepdim=True)
        else:
            counted = t["attention_mask"].bool()
        counted[:, 0] = False
        fired = (top.values > 0) & counted[..., None]
        tokens_fired += torch.bincount(top.indices[fired], minlength=n)
        per_prompt = torch.zeros(h.shape[0], n, dtype=torch.bool, device=dev)
        b = torch.arange(h.shape[0], device=dev)[:, None, None].expand_as(top.indices)
        per_prompt[b[fired], top.indices[fired]] = True
        prompts_fired += per_prompt.sum(0)
    return prompts_fired, tokens_fired


def time_scan(enc: Any, tok: Any, sae: SAE, prompts: Sequence[str], batch: int, reps: int = 3) -> list[Row]:
    """Each implementation `reps` times, interleaved (a shared machine's load hits them alike), the median;
    hf_loop_max_length once (it is an order of magnitude slower)."""
    cuda = sae.W_enc.device.type == "cuda"
    run = lambda: scan(enc, tok, sae, {"all": list(prompts)}, batch_size=batch, progress=False)  # noqa: E731
    counters = lambda st: (st.prompts_fired[0], st.tokens_fired[0])  # noqa: E731
    impls = {
        "snce_fast": lambda: counters(run()),
        "snce_unbucketed": lambda: counters(with_bucketing(False, run)),
        "hf_loop_longest": lambda: hf_loop(enc, tok, sae, prompts, batch, "longest"),
        "hf_loop_max_length": lambda: hf_loop(enc, tok, sae, prompts, batch, "max_length"),
    }
    run()  # warm-up
    secs: dict[str, list[float]] = {name: [] for name in impls}
    counts: dict[str, tuple[torch.Tensor, ...]] = {}
    for rep in range(reps):
        for name, fn in impls.items():
            if name == "hf_loop_max_length" and rep > 0:
                continue
            out, t = timed(fn, cuda)
            secs[name].append(t)
            counts[name] = tuple(c.cpu() for c in out)
    ref = counts["snce_fast"]
    rows = []
    for name, ts in secs.items():
        med = statistics.median(ts)
        rows.append({"impl": name, "prompts": len(prompts), "seconds": med, "runs_s": ts,
                     "prompts_per_s": len(prompts) / med, "snce_fast_speedup": med / statistics.median(
                         secs["snce_fast"]),
                     "counters_differing_from_snce_fast": sum(int((a != b).sum()) for a, b in zip(counts[name], ref))})
    return rows


def time_gate(enc: Any, tok: Any, sae: SAE, prompts: Sequence[str], refs: Sequence[str], batch: int,
              reps: int = 3) -> dict[str, list[Row]]:
    """detect and calibrate (64 candidate latents) with and without bucketing, interleaved, the median."""
    cuda = sae.W_enc.device.type == "cuda"
    neurons = list(range(0, sae.n_latents, max(1, sae.n_latents // 64)))[:64]
    det = lambda: detect(enc, sae, neurons, prompts, tokenizer=tok, batch_size=batch)  # noqa: E731
    cal = lambda: calibrate(enc, sae, neurons, prompts, refs, tokenizer=tok, batch_size=batch)  # noqa: E731
    det()  # warm-up
    secs: dict[tuple[str, bool], list[float]] = {}
    with warnings.catch_warnings():  # a random SAE identifies nothing: that is not what is measured
        warnings.simplefilter("ignore", CalibrationWarning)
        for _ in range(reps):
            for name, fn in (("detect", det), ("calibrate", cal)):
                for on in (True, False):
                    secs.setdefault((name, on), []).append(timed(lambda: with_bucketing(on, fn), cuda)[1])
    out: dict[str, list[Row]] = {"detect": [], "calibrate": []}
    for (name, on), ts in secs.items():
        n = len(prompts) + (len(refs) if name == "calibrate" else 0)
        out[name].append({"impl": "snce_fast" if on else "snce_unbucketed", "prompts": n,
                          "seconds": statistics.median(ts), "runs_s": ts, "prompts_per_s": n / statistics.median(ts)})
    return out


@torch.no_grad()
def token_rows(enc: Any, tok: Any, prompts: Sequence[str], hook: str = "output") -> torch.Tensor:
    """Counted-token activations [M, d] float32 of `prompts` at `hook`."""
    rows = []
    for tb in batching.bucketed(tok, list(prompts), None, eos_id(enc, tok), 64, batching.TOKEN_BUDGET):
        h = hook_activations(enc, tb.tokens, hook)
        rows.append(h[tb.counted.to(h.device)].float())
    return torch.cat(rows)


def _fvu(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    with torch.no_grad():
        err = sum(float((forward(c).float() - c).pow(2).sum()) for c in x.split(4096))
    return err / float((x - x.mean(0)).pow(2).sum())


def _batches(x: torch.Tensor, batch: int, steps: int):
    for i in range(steps):
        start = (i * batch) % max(1, len(x) - batch)
        yield x[start : start + batch]


Trainer = tuple[Callable[[int, torch.Tensor], None], Callable[[torch.Tensor], torch.Tensor], Callable[[], None]]


def _snce(x: torch.Tensor, n: int, k: int, batch: int, lr: float) -> Trainer:
    sae = init_for_training(SAE(x.shape[1], n, k, device=x.device), seed=0)
    tr = SAETrainer(sae, TrainConfig(n_latents=n, k=k, batch_size=batch, lr=lr, warmup_steps=1, progress=False))
    tr.init_b_dec(x[:batch])
    return (lambda i, xb: tr.step(xb)), sae, (lambda: None)


def _sparsify(x: torch.Tensor, n: int, k: int, batch: int, lr: float) -> Trainer:
    import sparsify.sparse_coder as sparse_coder
    import sparsify.utils as sparsify_utils
    from sparsify import SparseCoder, SparseCoderConfig

    restore = lambda: None  # noqa: E731
    if x.device.type != "cuda":  # its Triton decoder needs a GPU: its own eager fallback, as
        saved = sparse_coder.decoder_impl  # SPARSIFY_DISABLE_TRITON=1 selects (restored at the end)
        sparse_coder.decoder_impl = sparsify_utils.eager_decode
        restore = lambda: setattr(sparse_coder, "decoder_impl", saved)  # noqa: E731
    torch.manual_seed(0)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=n, k=k), device=x.device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)

    def step(i: int, xb: torch.Tensor) -> None:
        sae(xb).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    return step, (lambda c: sae(c).sae_out), restore


def _saelens(x: torch.Tensor, n: int, k: int, batch: int, lr: float) -> Trainer:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=n, k=k, device=str(x.device),
                                                dtype="float32"))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    dead = torch.zeros(n, dtype=torch.bool, device=x.device)

    def step(i: int, xb: torch.Tensor) -> None:
        out = sae.training_forward_pass(TrainStepInput(sae_in=xb, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=i, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step, (lambda c: sae.decode(sae.encode(c))), (lambda: None)


def time_training(x: torch.Tensor, held: torch.Tensor, n: int, k: int, batch: int, steps: int,
                  lr: Optional[float] = None) -> list[Row]:
    """Training steps of this package, sparsify and SAELens on the same activations, interleaved step by
    step (a shared machine's load hits them alike); a peer not installed gets a row saying so. Median
    step time over the steps after the first 3; FVU on `held` after the last step."""
    lr = lr if lr is not None else 2e-4 / (n / 2**14) ** 0.5  # this package's and sparsify's default
    cuda = x.device.type == "cuda"
    trainers: dict[str, Trainer] = {}
    rows: dict[str, Row] = {}
    for impl, make in (("snce_fast", _snce), ("sparsify", _sparsify), ("saelens", _saelens)):
        try:
            trainers[impl] = make(x, n, k, batch, lr)
        except ImportError as e:
            rows[impl] = {"impl": impl, "skipped": f"not installed ({e}); pip install -e '.[test]' installs it"}
    times: dict[str, list[float]] = {impl: [] for impl in trainers}
    try:
        for i, xb in enumerate(_batches(x, batch, steps)):
            for impl, (step, _, _) in trainers.items():
                times[impl].append(timed(lambda: step(i, xb), cuda)[1])
        for impl, (_, forward, _) in trainers.items():
            step_s = statistics.median(times[impl][3:] or times[impl])
            rows[impl] = {"impl": impl, "n": n, "k": k, "batch_tokens": batch, "lr": lr, "steps": steps,
                          "step_ms": 1e3 * step_s, "tokens_per_s": batch / step_s,
                          "heldout_fvu_after": _fvu(forward, held), "tokens_trained": batch * steps}
    finally:
        for _, _, restore in trainers.values():
            restore()
    out = [rows[impl] for impl in ("snce_fast", "sparsify", "saelens") if impl in rows]
    base = out[0].get("step_ms")
    for r in out:
        if base and "step_ms" in r:
            r["snce_fast_speedup"] = r["step_ms"] / base
    return out


def table(name: str, rows: list[Row]) -> str:
    """The rows of one pass as aligned text lines."""
    lines = [f"== {name}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"  {r['impl']:<20} skipped: {r['skipped']}")
        elif "wall_s" in r:
            lines.append(f"  {r['impl']:<20} {r['wall_s']:8.1f} s end to end, {r['steps']} steps, "
                         f"held-out FVU {r['heldout_fvu']:.3f}")
        elif "step_ms" in r:
            lines.append(f"  {r['impl']:<20} {r['step_ms']:8.1f} ms/step {r['tokens_per_s']:9.0f} tokens/s  "
                         f"held-out FVU {r['heldout_fvu_after']:.3f}  snce_fast x{r.get('snce_fast_speedup', 1):.2f}")
        else:
            extra = (f"  snce_fast x{r['snce_fast_speedup']:.2f}, {r['counters_differing_from_snce_fast']} counters "
                     "differ" if "snce_fast_speedup" in r else "")
            lines.append(f"  {r['impl']:<20} {r['prompts_per_s']:9.1f} prompts/s{extra}")
    return "\n".join(lines)
