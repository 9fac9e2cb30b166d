"""`snce-fast`: the command-line face of snce_fast.

Every subcommand checks its inputs before heavy work and exits non-zero with one clear
line on bad input; outputs are written to a temp name and renamed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _parse_neurons(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--neurons {text!r}: expected comma-separated latent indices, e.g. 1234 or 12,34") from None


def _existing_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{what} {path!r} is not a directory")
    return p


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _atomic_save_image(image: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    image.save(tmp)
    os.replace(tmp, path)


def _load_sae(path: str):
    from .sae import SAE

    _existing_dir(path, "--sae")
    try:
        return SAE.load(path)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


# -- info ----------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from .info import report

    print(report())
    return 0


# -- erase ---------------------------------------------------------------------------------
def _read_prompts_arg(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise UsageError(f"--prompts-file {args.prompts_file!r} does not exist")
        prompts += [line.strip() for line in f.read_text(errors="replace").splitlines() if line.strip()]
    if not prompts:
        raise UsageError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def cmd_erase(args: argparse.Namespace) -> int:
    from . import patching
    from .sae import SAE

    prompts = _read_prompts_arg(args)
    saes: dict[str, SAE] = {"text_encoder": _load_sae(args.sae)}
    if args.sae_2:
        saes["text_encoder_2"] = _load_sae(args.sae_2)
    neurons = _parse_neurons(args.neurons)
    for name, sae in saes.items():
        bad = [j for j in neurons if not 0 <= j < sae.n_latents]
        if bad:
            raise UsageError(f"--neurons: latent {bad[0]} is out of range for the SAE of {name} (n_latents={sae.n_latents})")
    model = args.model
    if not Path(model).exists() and ("/" not in model or model.startswith((".", "/"))):
        raise UsageError(f"--model {model!r}: no such local directory (or give a hub id like org/name)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=args.quiet)
    encoders = patching.text_encoders(pipe)  # raises TypeError naming the supported pipelines
    saes = saes if len(encoders) > 1 else {next(iter(encoders)): saes["text_encoder"]}
    if len(encoders) > 1 and len(saes) < 2:
        raise UsageError(f"{type(pipe).__name__} has two text encoders: give --sae for text_encoder and --sae-2 for text_encoder_2")

    def generate(prompt: str, seed: int):
        gen = torch.Generator("cpu").manual_seed(seed)
        kw = dict(num_inference_steps=args.steps, generator=gen)
        if args.height:
            kw.update(height=args.height, width=args.width or args.height)
        if args.guidance is not None:
            kw["guidance_scale"] = args.guidance
        return pipe(prompt, **kw).images[0]

    record: dict[str, Any] = {
        "model": model, "sae": args.sae, "sae_2": args.sae_2, "neurons": neurons, "scale": args.scale,
        "clamp": args.clamp, "mode": args.mode, "gate": args.gate, "min_tokens": args.min_tokens,
        "steps": args.steps, "guidance": args.guidance, "seeds": args.seed, "images": [],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    originals = {}
    if args.compare:
        for i, prompt in enumerate(prompts):
            for seed in args.seed:
                originals[(i, seed)] = generate(prompt, seed)
    with patching.patched(pipe, saes, neurons, scale=args.scale, clamp=args.clamp, mode=args.mode,
                          gate=args.gate, min_tokens=args.min_tokens):
        for i, prompt in enumerate(prompts):
            for seed in args.seed:
                img = generate(prompt, seed)
                name = f"{i:04d}_seed{seed}"
                _atomic_save_image(img, out / f"{name}_erased.png")
                entry = {"prompt": prompt, "seed": seed, "erased": f"{name}_erased.png"}
                if args.compare:
                    _atomic_save_image(originals[(i, seed)], out / f"{name}_original.png")
                    _atomic_save_image(side_by_side(originals[(i, seed)], img), out / f"{name}_compare.png")
                    entry.update(original=f"{name}_original.png", compare=f"{name}_compare.png")
                record["images"].append(entry)
    _atomic_write_text(out / "record.json", json.dumps(record, indent=2) + "\n")
    if not args.quiet:
        print(f"wrote {len(record['images'])} image(s) and record.json to {out}")
    return 0


def side_by_side(left: Any, right: Any, gap: int = 4) -> Any:
    """One PNG-ready image: original on the left, erased on the right."""
    from PIL import Image

    w, h = left.width + right.width + gap, max(left.height, right.height)
    grid = Image.new("RGB", (w, h), "white")
    grid.paste(left, (0, 0))
    grid.paste(right, (left.width + gap, 0))
    return grid


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snce-fast",
        description="Single Neuron-based Concept Erasure for diffusion pipelines: find the SAE latent that "
        "carries a concept and suppress it in the text encoder.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="which backends were built and which one each device uses")
    p.set_defaults(func=cmd_info)

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
    p.add_argument("--neurons", required=True, help="latent indices, comma-separated")
    p.add_argument("--scale", type=float, default=0.0, help="z_j <- scale * z_j (0 removes; default 0)")
    p.add_argument("--clamp", type=float, default=None, help="z_j <- min(z_j, clamp) instead of scaling")
    p.add_argument("--mode", choices=("residual", "reconstruct"), default="residual")
    p.add_argument("--gate", action="store_true", help="edit a prompt only if a target fires on >= --min-tokens tokens")
    p.add_argument("--min-tokens", type=int, default=1)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--seed", type=int, action="append", help="seed(s) (repeatable; default 0)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--compare", action="store_true", help="also save the unpatched image and a side-by-side PNG")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_erase)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "seed", "absent") is None:
        args.seed = [0]
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as e:
        print(f"snce-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (TypeError, ValueError, FileNotFoundError) as e:
        print(f"snce-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"snce-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
