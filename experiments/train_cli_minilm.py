"""Held-out check of an SAE trained by `snce-fast train` on MiniLM embeddings of coco_30k.

The training itself is the CLI command (recorded in docs/training.md), e.g.

    OMP_NUM_THREADS=1 snce-fast train --model minilm --prompts-file PROMPTS/coco_30k.csv \
        --limit 29000 --n-latents 4096 --k 32 --batch-size 1024 --epochs 12 ... --out minilm_sae_cli

This script loads that SAE and its train_report.json, measures FVU / L0 / latent usage on the last
`--heldout` captions of the corpus (never trained on when --limit <= len - heldout), and writes
experiments/results/train_cli_minilm_cpu.json (train report without the per-step history, which
is summarised, plus the held-out metrics).

    python experiments/train_cli_minilm.py --sae minilm_sae_cli [--wall-s SECONDS]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate_minilm import _commit, heldout_metrics  # noqa: E402

from snce_fast.models import load_encoder  # noqa: E402
from snce_fast.workflow.corpus import read_prompts  # noqa: E402
from snce_fast.sae.model import SAE  # noqa: E402

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", required=True, help="directory written by snce-fast train")
    ap.add_argument("--heldout", type=int, default=1000)
    ap.add_argument("--wall-s", type=float, default=None, help="wall time of the whole train command, if measured outside")
    ap.add_argument("--command", default=None, help="the exact train command, for the record")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rep = json.loads((Path(args.sae) / "train_report.json").read_text())
    settings, cfg = rep["settings"], rep["config"]
    prompts = read_prompts(settings["prompts_file"], column=settings["column"])
    n_train = settings["n_prompts"]
    if n_train > len(prompts) - args.heldout:
        raise SystemExit(f"the SAE was trained on {n_train} prompts: the last {args.heldout} of {len(prompts)} overlap")
    held = prompts[-args.heldout:]
    loaded = load_encoder(settings["model"])
    sae = SAE.load(args.sae)
    held_m = heldout_metrics(loaded.encoder, loaded.tokenizer, sae, held, cfg["max_length"])
    hist = rep.pop("history")
    out = {
        "benchmark": "train_cli_minilm",
        "device": f"CPU ({cfg.get('device')}, OMP_NUM_THREADS=1, 2-core machine shared with other jobs)",
        "torch": torch.__version__, "python": platform.python_version(), "commit": _commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": args.command, "wall_s_command": args.wall_s,
        "data": f"{Path(settings['prompts_file']).name}: first {n_train} captions for training, "
                f"last {args.heldout} held out",
        "train_report": rep,
        "fvu_curve": [(h["step"], round(h["fvu"], 4), round(h["dead_fraction"], 4)) for h in hist[::10]],
        "heldout": held_m,
    }
    path = ROOT / "results" / "train_cli_minilm_cpu.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"train_fvu": rep["fvu"], "train_l0": rep["l0"], "dead_fraction": rep["dead_fraction"],
                      "never_fired_fraction": rep["never_fired_fraction"], "heldout": held_m}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
