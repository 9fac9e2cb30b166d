"""`snce-fast erase`: generate images with the concept latent(s) suppressed."""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from PIL import Image

from snce_fast.cli._common import (
    add_edit_args,
    add_prompt_file_args,
    apply_calibration,
    atomic_save_image,
    atomic_write_json,
    check_edit_options,
    check_neurons,
    check_out_dir,
    check_pipeline_arg,
    check_slim_mode,
    edit_options,
    load_pipeline,
    load_sae,
    output_lock,
    parse_neurons,
    positive,
    read_prompts_arg,
    require_sae_per_encoder,
)
from snce_fast.evaluation import check_guidance
from snce_fast.hooks import patching
from snce_fast.workflow.detect import detect


def _check_flags(args: argparse.Namespace) -> tuple[list[str], Any]:
    """The prompts and the numeric flags, before anything is loaded; the --out path."""
    prompts = read_prompts_arg(args)
    out = check_out_dir(args.out)
    positive(args.steps, "--steps")
    positive(args.height, "--height", 8)
    positive(args.width, "--width", 8)
    if args.guidance is not None:
        check_guidance(args.guidance, "--guidance")
    return prompts, out


def _load_saes(args: argparse.Namespace) -> tuple[dict[str, Any], list[int]]:
    """{encoder: SAE} from --sae / --sae-2 and the neurons (--neurons or --calibration), checked against them."""
    saes: dict[str, Any] = {"text_encoder": load_sae(args.sae)}
    apply_calibration(args, saes["text_encoder"])
    check_edit_options(args)
    if args.sae_2:
        saes["text_encoder_2"] = load_sae(args.sae_2, "--sae-2")
    neurons = parse_neurons(args.neurons)
    check_slim_mode(saes, args.mode, neurons)
    for name, sae in saes.items():
        check_neurons(neurons, sae.n_latents, f"the SAE of {name}")
    return saes, neurons


def cmd_erase(args: argparse.Namespace) -> int:
    prompts, out = _check_flags(args)
    with output_lock(out):
        return _run(args, prompts, out)


def _run(args: argparse.Namespace, prompts: list[str], out: Any) -> int:
    saes, neurons = _load_saes(args)
    if not args.seed:
        args.seed = [0]
    model = args.model
    check_pipeline_arg(model, saes)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=args.quiet)
    encoders = patching.text_encoders(pipe)  # raises TypeError naming the supported pipelines
    require_sae_per_encoder(type(pipe).__name__, len(encoders), saes)
    saes = saes if len(encoders) > 1 else {next(iter(encoders)): saes["text_encoder"]}
    edit = edit_options(args)
    with patching.patched(pipe, saes, neurons, **edit):
        pass  # an SAE that does not fit the encoder fails here, before any image is made
    out.mkdir(parents=True, exist_ok=True)

    def generate(prompt: str, seed: int):
        gen = torch.Generator("cpu").manual_seed(seed)
        kw = dict(num_inference_steps=args.steps, generator=gen)
        if args.height or args.width:  # one given: a square image
            kw.update(height=args.height or args.width, width=args.width or args.height)
        if args.guidance is not None:
            kw["guidance_scale"] = args.guidance
        return pipe(prompt, **kw).images[0]

    record: dict[str, Any] = {
        "model": model, "sae": args.sae, "sae_2": args.sae_2, "neurons": neurons, "scale": args.scale,
        "clamp": args.clamp, "mode": args.mode, "gate": args.gate, "min_tokens": args.min_tokens,
        "gate_threshold": args.gate_threshold, "calibration": args.calibration,
        "steps": args.steps, "guidance": args.guidance, "height": args.height or args.width,
        "width": args.width or args.height, "seeds": args.seed, "images": [],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    fired = _neuron_fires(pipe, saes, neurons, prompts, edit)
    originals = {}
    if args.compare:
        for i, prompt in enumerate(prompts):
            for seed in args.seed:
                originals[(i, seed)] = generate(prompt, seed)
    with patching.patched(pipe, saes, neurons, **edit):
        for i, prompt in enumerate(prompts):
            for seed in args.seed:
                img = generate(prompt, seed)
                name = f"{i:04d}_seed{seed}"
                atomic_save_image(img, out / f"{name}_erased.png")
                entry = {"prompt": prompt, "seed": seed, "erased": f"{name}_erased.png", **fired[i]}
                if args.compare:
                    atomic_save_image(originals[(i, seed)], out / f"{name}_original.png")
                    atomic_save_image(side_by_side(originals[(i, seed)], img), out / f"{name}_compare.png")
                    entry.update(original=f"{name}_original.png", compare=f"{name}_compare.png")
                record["images"].append(entry)
    atomic_write_json(out / "record.json", record)
    if not args.quiet:
        print(f"wrote {len(record['images'])} image(s) and record.json to {out}")
    return 0


def _neuron_fires(pipe: Any, saes: dict[str, Any], neurons: Any, prompts: list[str],
                  edit: dict[str, Any]) -> list[dict[str, Any]]:
    """Per prompt: whether a target latent fires on a counted token (`neuron_fired`, its largest
    activation `neuron_score`) and whether the patch edits the prompt (`edited`: it fires and, with
    --gate, passes the gate's threshold and min_tokens)."""
    fires = detect(pipe, saes, neurons, prompts)
    gated = detect(pipe, saes, neurons, prompts, min_tokens=edit["min_tokens"],
                   threshold=edit["threshold"]) if edit["gate"] else fires
    return [{"neuron_fired": bool(f), "neuron_score": float(sc), "edited": bool(g)}
            for f, sc, g in zip(fires.flags.tolist(), fires.scores.tolist(), gated.flags.tolist())]


def side_by_side(left: Any, right: Any, gap: int = 4, labels: tuple[str, str] = ("original", "erased")) -> Any:
    """One PNG-ready image: original on the left, erased on the right, each labelled in a strip above."""
    from PIL import ImageDraw

    strip = 14
    w, h = left.width + right.width + gap, max(left.height, right.height) + strip
    grid = Image.new("RGB", (w, h), "white")
    grid.paste(left, (0, strip))
    grid.paste(right, (left.width + gap, strip))
    draw = ImageDraw.Draw(grid)
    draw.text((2, 1), labels[0], fill="black")
    draw.text((left.width + gap + 2, 1), labels[1], fill="black")
    return grid


def register(sub: Any) -> None:
    p = sub.add_parser(
        "erase",
        help="generate images with the concept latent(s) suppressed",
        description="Load a diffusers pipeline (local dir or hub id), patch it with an SAE and neurons, "
        "generate images; writes PNGs and record.json (every setting). --compare adds the unpatched "
        "image and a side-by-side PNG.",
    )
    p.add_argument("--model", required=True, help="diffusers pipeline directory or hub id")
    p.add_argument("--sae", required=True, help="SAE directory for text_encoder (config.json + sae.safetensors)")
    p.add_argument("--sae-2", help="SAE directory for SDXL's text_encoder_2")
    add_edit_args(p)
    add_prompt_file_args(p)
    p.add_argument("--seed", type=int, action="append", help="seed(s) (repeatable; default 0)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps per image (default 30)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, a number >= 0 "
                   "(default: the pipeline's, 7.5 for SD1.x)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8 (default: "
                   "--width when given, else the pipeline's, 512 for SD1.x)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8 (default: "
                   "--height when given, else the pipeline's)")
    p.add_argument("--compare", action="store_true", help="also save the unpatched image and a side-by-side PNG")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars (denoising, pipeline loading) or summary")
    p.set_defaults(func=cmd_erase, loads_pipeline=True)
