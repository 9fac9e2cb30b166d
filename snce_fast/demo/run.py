"""The whole SNCE workflow on a real text encoder, offline: `snce-fast demo`.

Stages: load the encoder (the embedded all-MiniLM-L6-v2 by default) -> train a TopK SAE on
the demo's own prompts -> scan concept vs ordinary prompts -> score and pick the neuron
(report with its top prompts) -> `detect` on held-out prompts -> the residual edit: ordinary
prompts on which the neuron is silent come out bit-identical, concept prompts lose the
neuron's contribution. Every number in the summary is computed in this run.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from snce_fast import plots
from snce_fast.checks import positive_int
from snce_fast.demo.prompts import DemoPrompts, demo_prompts
from snce_fast.hooks.activations import encoder_device, tokenize, uses_attention_mask
from snce_fast.hooks.patching import patched
from snce_fast.models import load_encoder
from snce_fast.records.atomic import atomic_write_json, atomic_write_text
from snce_fast.sae.model import SAE
from snce_fast.train import TrainingWarning, train_sae
from snce_fast.workflow.contrastive import Family, activation_table, contrastive
from snce_fast.workflow.detect import detect
from snce_fast.workflow.latent_report import report, top_prompts
from snce_fast.workflow.scan import scan
from snce_fast.workflow.score import score

MAX_LENGTH = 32  # the demo's prompts are short; padding to 32 keeps every stage fast on a CPU
DEMO_THREADS = 2  # the numbers in docs/demo.md were measured with 2 threads


def settings(quick: bool) -> dict[str, Any]:
    """SAE and training settings of the demo (reduced with `quick`)."""
    if quick:
        return {"n_latents": 512, "k": 8, "epochs": 4, "batch_size": 512, "lr": 2e-3, "warmup_steps": 10}
    return {"n_latents": 1024, "k": 8, "epochs": 5, "batch_size": 1024, "lr": 2e-3, "warmup_steps": 20}


@torch.no_grad()
def _hidden(enc: Any, tok: Any, prompts: list[str], pen: bool, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a pipeline consumes from the encoder (last_hidden_state, or hidden_states[-2] for SDXL's
    penultimate read), through the full forward so a patch on the encoder takes effect; + the attention mask."""
    batch = tokenize(tok, prompts, max_length)
    kwargs = {"input_ids": batch["input_ids"].to(encoder_device(enc))}
    if uses_attention_mask(enc) and "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"].to(kwargs["input_ids"].device)
    out = enc(**kwargs, output_hidden_states=pen)
    h = out.hidden_states[-2] if pen else out.last_hidden_state
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    return h.float().cpu(), mask


def _pooled(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b[None].expand_as(a), dim=-1)


def _fires_anywhere(h: torch.Tensor, sae: SAE, neuron: int) -> torch.Tensor:
    """[P] whether `neuron` is in a token's top k with a positive value at some position >= 1
    (the positions the residual edit may change: BOS is never edited, padding is)."""
    values, indices = sae.encode(h[:, 1:].to(sae.W_enc.dtype))
    return ((indices == neuron) & (values > 0)).flatten(1).any(1)


def run_demo(
    out: str | Path,
    model: str = "minilm",
    encoder: str = "text_encoder",
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    prompts: Optional[DemoPrompts] = None,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    """Run every stage, write the SAE, scan, report, plots and summary into `out`; return the summary.
    torch runs on `threads` CPU threads (default DEMO_THREADS, whatever the machine has), so a run prints
    the same numbers on any machine with the same kind of CPU (float sums depend on the thread split)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(positive_int(threads, "threads") if threads is not None else DEMO_THREADS)
    try:
        return _run(Path(out), model, encoder, quick, seed, progress, log, prompts)
    finally:
        torch.set_num_threads(old_threads)


def _run(out: Path, model: str, encoder: str, quick: bool, seed: int, progress: bool, log: Callable[[str], None],
         prompts: Optional[DemoPrompts]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    data = prompts or demo_prompts(quick=quick, seed=seed)
    cfg = settings(quick)
    times: dict[str, float] = {}
    n_stages = 6

    def stage(i: int, text: str) -> float:
        log(f"[{i}/{n_stages}] {text}")
        return time.perf_counter()

    torch.manual_seed(seed)
    t = stage(1, f"loading the text encoder ({model})")
    loaded = load_encoder(model, encoder)
    enc, tok, pen = loaded.encoder, loaded.tokenizer, loaded.penultimate_output
    limit = getattr(tok, "model_max_length", None)
    max_length = min(MAX_LENGTH, limit) if isinstance(limit, int) and limit > 0 else MAX_LENGTH
    times["load"] = time.perf_counter() - t

    t = stage(2, f"training a TopK SAE (n {cfg['n_latents']}, k {cfg['k']}) on {len(data.train)} prompts")
    sae, rep = _train_stage(loaded, data, cfg, max_length, seed, progress)
    sae.eval().requires_grad_(False)
    sae.save(out / "sae")
    plots.training_curves(rep.history, out / "training.png", f"{loaded.name}: n {cfg['n_latents']}, k {cfg['k']}")
    times["train"] = time.perf_counter() - t

    t = stage(3, f"scanning {len(data.scan_concept)} {data.concept} vs {len(data.scan_ordinary)} ordinary prompts")
    stats = scan(enc, tok, sae, {data.concept: data.scan_concept, "ordinary": data.scan_ordinary},
                 max_length=max_length, progress=progress, penultimate_output=pen)
    stats.save(out / "scan")
    times["scan"] = time.perf_counter() - t

    t = stage(4, "scoring latents; picking the neuron by contrastive identification (docs/identification.md)")
    scores, top5, report_path = _score_stage(stats, data, out)
    pick = _calibrate_stage(enc, tok, sae, data, pen, max_length)
    neuron = pick["latent"]
    tops = top_prompts(enc, tok, sae, data.scan_concept + data.scan_ordinary, sorted({neuron, *top5}), k=5,
                       penultimate_output=pen, max_length=max_length)
    report(stats, scores, out / "report", neurons=top5, top=tops)
    f_c, f_o = stats.frequency(data.concept), stats.frequency("ordinary")
    times["score"] = time.perf_counter() - t

    t = stage(5, f"detect on {len(data.held_concept)} + {len(data.held_ordinary)} held-out prompts (latent {neuron} "
                 "at its calibrated threshold; also the scorer's top latents)")
    detection = _detect_stage(enc, tok, sae, pick, top5, data, pen, max_length)
    plots.detection_histogram(out / "detect.png", detection.pop("concept_scores"), detection.pop("ordinary_scores"),
                              neuron, data.concept, threshold=pick["threshold"])
    times["detect"] = time.perf_counter() - t

    t = stage(6, "residual edit: patching the encoder and comparing its outputs")
    edit = _edit_check(enc, tok, sae, neuron, data, pen, max_length)
    times["edit"] = time.perf_counter() - t

    summary = {
        "model": loaded.name, "concept": data.concept, "quick": quick, "seed": seed, "max_length": max_length,
        "sae": {**sae.config(), "train_fvu": rep.fvu, "l0": rep.l0, "dead_fraction": rep.dead_fraction,
                "train_tokens": rep.tokens, "steps": rep.steps},
        "prompts": {name: len(getattr(data, name)) for name in
                    ("train", "scan_concept", "scan_ordinary", "held_concept", "held_ordinary")},
        "neuron": neuron,
        "neuron_rule": pick,
        "top_latents": [{"latent": j, "score": float(scores.values[j]), "f_concept": float(f_c[j]),
                         "f_ordinary": float(f_o[j])} for j in top5],
        "neuron_top_prompts": [text for _, text in tops.get(neuron, [])],
        "detect": detection,
        "edit": edit,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "files": {"sae": "sae/", "scan": "scan/", "report": str(report_path.relative_to(out)),
                  "detect_plot": "detect.png", "training_plot": "training.png", "summary": "summary.md"},
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    return summary


def _train_stage(loaded: Any, data: DemoPrompts, cfg: dict[str, Any], max_length: int, seed: int,
                 progress: bool) -> tuple[SAE, Any]:
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
        # the demo's short run is deliberate (its settings are measured on its own prompts, docs/demo.md),
        # and its held-out prompts are its own: no TrainingWarning, no held-out split of the training set
        warnings.simplefilter("ignore", TrainingWarning)
        return train_sae(
            loaded.encoder, loaded.tokenizer, data.train, hook="output", penultimate_output=loaded.penultimate_output,
            max_length=max_length, cache_dir=cache, dead_tokens=20_000, shuffle_buffer=16_384, prompt_batch_size=128,
            seed=seed, progress=progress, encoder_name=loaded.name, return_report=True, holdout=0.0, **cfg,
        )


def _score_stage(stats: Any, data: DemoPrompts, out: Path) -> tuple[Any, list[int], Path]:
    """Score the latents (concept vs ordinary scan prompts) and name the report's path."""
    scores = score(stats, target=data.concept, reference="ordinary")
    return scores, scores.top(5), out / "report" / "report.md"


def demo_families(data: DemoPrompts) -> list[Family]:
    """The scan's concept prompts as phrasing families (with their neutral twins), or one family without
    twins when the prompt set has none."""
    if data.scan_twins:
        fams: dict[str, Family] = {}
        for c, t, f in zip(data.scan_concept, data.scan_twins, data.scan_families or [data.concept] * len(data.scan_twins)):
            fam = fams.setdefault(f, Family(f, [], []))
            fam.concept.append(c)
            fam.twins.append(t)
        return list(fams.values())
    return [Family(data.concept, list(data.scan_concept), [])]


def _calibrate_stage(enc: Any, tok: Any, sae: SAE, data: DemoPrompts, pen: bool, max_length: int) -> dict[str, Any]:
    """The neuron by contrastive identification (docs/identification.md): each latent's threshold flags at
    most 5% of the concept prompts' neutral twins and 1% of the ordinary scan prompts; the latent whose worst
    phrasing family has the best recall minus twin rate wins."""
    fams = demo_families(data)
    prompts = [p for f in fams for p in f.concept + f.twins] + list(data.scan_ordinary)
    table = activation_table(enc, sae, prompts, tokenizer=tok, max_length=max_length, penultimate_output=pen)
    fit = contrastive(table, fams, {"ordinary": data.scan_ordinary})
    latent = fit.top(1)[0]
    sel = fit.selection([latent])
    concept = [p for f in fams for p in f.concept]
    recall = float((table.rows(concept)[:, table.column([latent])] > sel.thresholds[0]).float().mean())
    return {"rule": "contrastive", "latent": latent, "threshold": sel.thresholds[0], "fpr": fit.fpr,
            "twin_fpr": fit.twin_fpr, "scan_recall": recall, "scan_ordinary_rate": sel.reference_rates["ordinary"],
            "scan_twin_rate": sel.twin_rate, "family_recall": sel.family_recall}


def _detect_stage(enc: Any, tok: Any, sae: SAE, pick: dict[str, Any], top5: list[int], data: DemoPrompts,
                  pen: bool, max_length: int) -> dict[str, Any]:
    """Held-out detection with the calibrated neuron at its threshold; for comparison, the scorer's top
    latent and its top 2 / 4 latents at threshold 0 (any firing)."""

    def rates(latents: list[int], threshold: Any = 0.0) -> tuple[Any, Any]:
        kw = dict(tokenizer=tok, max_length=max_length, threshold=threshold, penultimate_output=pen)
        return detect(enc, sae, latents, data.held_concept, **kw), detect(enc, sae, latents, data.held_ordinary, **kw)

    def row(latents: list[int], c: Any, o: Any) -> dict[str, Any]:
        return {"latents": latents, "true_positive_rate": float(c.flags.float().mean()),
                "false_positive_rate": float(o.flags.float().mean())}

    det_c, det_o = rates([pick["latent"]], pick["threshold"])
    return {
        "threshold": pick["threshold"],
        "true_positive_rate": float(det_c.flags.float().mean()),
        "false_positive_rate": float(det_o.flags.float().mean()),
        "concept_flagged": int(det_c.flags.sum()), "ordinary_flagged": int(det_o.flags.sum()),
        "score_top": [row(top5[:count], *rates(top5[:count])) for count in (1, 2, 4)],
        "concept_scores": det_c.scores, "ordinary_scores": det_o.scores,
    }


@torch.no_grad()
def _edit_check(enc: Any, tok: Any, sae: SAE, neuron: int, data: DemoPrompts, pen: bool,
                max_length: int) -> dict[str, Any]:
    """Compare the hooked tensor with and without the residual-mode patch (scale 0)."""
    before_o, mask_o = _hidden(enc, tok, data.held_ordinary, pen, max_length)
    before_c, mask_c = _hidden(enc, tok, data.held_concept, pen, max_length)
    before_s, mask_s = _hidden(enc, tok, data.scan_concept, pen, max_length)
    before_r, mask_r = _hidden(enc, tok, data.scan_ordinary, pen, max_length)
    with patched(enc, sae, neuron, scale=0.0, mode="residual", penultimate_output=pen):
        after_o, _ = _hidden(enc, tok, data.held_ordinary, pen, max_length)
        after_c, _ = _hidden(enc, tok, data.held_concept, pen, max_length)
    silent_o = ~_fires_anywhere(before_o, sae, neuron)
    identical_o = torch.tensor([torch.equal(a, b) for a, b in zip(before_o, after_o)])
    fires_c = _fires_anywhere(before_c, sae, neuron)
    changed_c = ~torch.tensor([torch.equal(a, b) for a, b in zip(before_c, after_c)])
    # the change must lie along W_dec[neuron] only
    delta = (after_c - before_c).reshape(-1, before_c.shape[-1])
    w = sae.W_dec[neuron].float()
    w = w / w.norm()
    off_axis = (delta - (delta @ w)[:, None] * w).norm() / delta.norm().clamp_min(1e-12)
    # how much of the concept direction (centroid difference) the edit removes, on mean-pooled embeddings
    direction = _pooled(before_s, mask_s).mean(0) - _pooled(before_r, mask_r).mean(0)
    cos_before = _cos(_pooled(before_c, mask_c), direction)
    cos_after = _cos(_pooled(after_c, mask_c), direction)
    refire = _fires_anywhere(after_c, sae, neuron)
    return {
        "ordinary_silent": int(silent_o.sum()),
        "ordinary_silent_bit_identical": int((identical_o & silent_o).sum()),
        "ordinary_changed": int((~identical_o).sum()),
        "concept_neuron_fires": int(fires_c.sum()),
        "concept_changed": int(changed_c.sum()),
        "concept_refires_after_edit": int(refire.sum()),
        "change_off_neuron_axis_relative": float(off_axis) if bool(changed_c.any()) else 0.0,
        "concept_direction_cosine_before": float(cos_before.mean()),
        "concept_direction_cosine_after": float(cos_after.mean()),
    }


def summary_markdown(s: dict[str, Any]) -> str:
    """The run's summary as Markdown (every number from `s`)."""
    d, e, p, r = s["detect"], s["edit"], s["prompts"], s["neuron_rule"]
    lines = [
        f"# snce-fast demo: erasing *{s['concept']}* from {s['model']}",
        "",
        f"SAE: n {s['sae']['n_latents']}, k {s['sae']['k']}, hook `{s['sae']['hook']}`, trained on {p['train']} "
        f"prompts ({s['sae']['train_tokens']} tokens, {s['sae']['steps']} steps): training FVU "
        f"{s['sae']['train_fvu']:.3f}, dead latents {s['sae']['dead_fraction']:.1%}.",
        "",
        f"## The neuron: latent {s['neuron']}",
        "",
        f"Picked by contrastive identification (docs/identification.md): its threshold {r['threshold']:.4g} flags "
        f"{r['scan_ordinary_rate']:.1%} of the ordinary scan prompts (at most {r['fpr']['ordinary']:.0%}), "
        + ("" if r["scan_twin_rate"] is None else
           f"{r['scan_twin_rate']:.1%} of the concept prompts' neutral twins (at most {r['twin_fpr']:.0%}), ")
        + f"and {r['scan_recall']:.1%} of the {s['concept']} scan prompts ("
        + ", ".join(f"{f} {x:.0%}" for f, x in r["family_recall"].items())
        + "): the best worst-family recall minus twin rate of any latent.",
        "",
        "The scorer's top latents (any firing, scan prompts):",
        "",
        "| latent | score | fires on concept prompts | fires on ordinary prompts |",
        "|---:|---:|---:|---:|",
        *[f"| {t['latent']} | {t['score']:.3f} | {t['f_concept']:.1%} | {t['f_ordinary']:.1%} |" for t in s["top_latents"]],
        "",
        f"Prompts where latent {s['neuron']} fires most:",
        "",
        *[f"1. {t}" for t in s["neuron_top_prompts"]],
        "",
        "## detect on held-out prompts (concept wording never seen in training or scanning)",
        "",
        f"Latent {s['neuron']} at its calibrated threshold:",
        "",
        f"- flagged {d['concept_flagged']} of {p['held_concept']} {s['concept']} prompts "
        f"(true-positive rate {d['true_positive_rate']:.1%})",
        f"- flagged {d['ordinary_flagged']} of {p['held_ordinary']} ordinary prompts "
        f"(false-positive rate {d['false_positive_rate']:.1%})",
        "",
        "For comparison, the scorer's top latents at threshold 0 (any firing):",
        "",
        *[f"- top {len(m['latents'])} {m['latents']}: true-positive rate {m['true_positive_rate']:.1%}, "
          f"false-positive rate {m['false_positive_rate']:.1%}" for m in d["score_top"]],
        "",
        "![detect scores](detect.png)",
        "",
        "## The residual-mode edit (scale 0)",
        "",
        f"- ordinary prompts on which the neuron is silent: {e['ordinary_silent']} of {p['held_ordinary']}; "
        f"bit-identical after patching: {e['ordinary_silent_bit_identical']} of {e['ordinary_silent']}",
        f"- {s['concept']} prompts on which the neuron fires: {e['concept_neuron_fires']} of {p['held_concept']}; "
        f"changed by the patch: {e['concept_changed']}; the change lies along the neuron's decoder row "
        f"(off-axis share {e['change_off_neuron_axis_relative']:.1e})",
        f"- cosine of held-out {s['concept']} prompts (mean-pooled) with the concept direction: "
        f"{e['concept_direction_cosine_before']:.3f} before, {e['concept_direction_cosine_after']:.3f} after",
        "",
        "Stage seconds: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()),
        "",
    ]
    return "\n".join(lines)
