"""`snce-fast train`: train a TopK SAE on a text encoder's token embeddings of a prompt corpus.

The settings are checked by the library (`TrainConfig.validate`); this module only reports an
invalid one by its flag (docs/training.md describes every setting)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from snce_fast.cli._common import (
    UsageError,
    add_model_args,
    check_out_dir,
    existing_file,
    load_encoder,
    output_lock,
    positive,
    read_prompt_file,
)
from snce_fast.hooks.points import resolve
from snce_fast.models import LoadedEncoder
from snce_fast.plots import training_curves
from snce_fast.records.atomic import atomic_write_text, check_writable_dir, json_text
from snce_fast.sae.model import SAE
from snce_fast.hooks.batching import TOKEN_BUDGET
from snce_fast.train import SettingError, TrainConfig, TrainReport, latest_checkpoint, train_sae

# TrainConfig fields that have their own flag (the rest are reachable with --set KEY=VALUE)
_FLAGS = {
    "n_latents": "--n-latents", "k": "--k", "hook": "--hook", "batch_size": "--batch-size",
    "prompt_batch_size": "--prompt-batch-size", "token_budget": "--token-budget", "epochs": "--epochs",
    "train_tokens": "--train-tokens", "holdout": "--holdout", "max_steps": "--max-steps", "lr": "--lr",
    "warmup_steps": "--warmup-steps", "max_length": "--max-length", "dead_tokens": "--dead-tokens",
    "cache_dir": "--cache-dir", "checkpoint_dir": "--checkpoint-dir", "checkpoint_every": "--checkpoint-every",
    "seed": "--seed", "device": "--device", "log_every": "--log-every",
}
# fields the command sets itself
_RESERVED = ("progress", "encoder_name", "penultimate_output", "resume")


def _parse_sets(items: list[str]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set aux_k=256")
        if key not in fields or key in _RESERVED:
            valid = sorted(k for k in fields if k not in _RESERVED)
            raise UsageError(f"--set {item!r}: {key!r} is not a training setting; expected one of {valid}")
        if key in _FLAGS:
            raise UsageError(f"--set {item!r}: use {_FLAGS[key]} for {key!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text  # a bare string such as median
        default = fields[key].default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UsageError(f"--set {item!r}: expected true or false for {key!r}")
        out[key] = value
    return out


def _flag_message(e: SettingError) -> str:
    """A library SettingError in the command's terms: the flag (or --set KEY=VALUE) and its value."""
    requirement = e.describe(lambda name: _FLAGS.get(name, name))
    if e.setting in _FLAGS:
        shown = repr(e.value) if isinstance(e.value, str) else str(e.value)
        return f"{_FLAGS[e.setting]} {shown}: {requirement}"
    return f"--set {e.setting}={e.value!r}: {requirement}"


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig for `args`, validated, with errors naming the flag."""
    positive(args.limit, "--limit")  # a corpus option, not a training setting
    values = {name: getattr(args, flag.lstrip("-").replace("-", "_")) for name, flag in _FLAGS.items()}
    values.update(_parse_sets(args.set or []))
    values["progress"] = not args.quiet
    cfg = TrainConfig(**values)
    try:
        cfg.validate()
    except SettingError as e:
        raise UsageError(_flag_message(e)) from None
    return cfg


def _writable(path: Path, flag: str) -> None:
    """`flag`'s directory can be written (checked before any work; snce_fast.records.atomic)."""
    try:
        check_writable_dir(path)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def _check_out(out: Path, overwrite: bool) -> None:
    check_out_dir(str(out), "a directory for the SAE")
    if not overwrite and out.is_dir() and ((out / "config.json").exists() or (out / "sae.safetensors").exists()):
        raise UsageError(f"--out {str(out)!r} already holds an SAE: pass --overwrite, or choose another directory")
    _writable(out, "--out")


def _read_corpus(args: argparse.Namespace, out: Path) -> list[str]:
    existing_file(args.prompts_file, "--prompts-file")
    _check_out(out, args.overwrite)
    prompts = read_prompt_file(args.prompts_file, "--prompts-file", args.column, args.limit)
    if not prompts:
        raise UsageError(f"--prompts-file {args.prompts_file!r}: no usable prompts (every row blank or undecodable)")
    return prompts


def _plan_checkpoints(cfg: TrainConfig) -> tuple[Optional[int], Optional[Path]]:
    """(the step a rerun resumes from, the activation cache kept beside the checkpoints), each or None.
    With --checkpoint-dir and epochs > 1 the cache defaults to CHECKPOINT_DIR/activation_cache: it
    must survive a resume."""
    if cfg.checkpoint_dir is None:
        return None, None
    try:
        ck = latest_checkpoint(cfg.checkpoint_dir)
    except FileNotFoundError as e:
        raise UsageError(f"--checkpoint-dir: {e}") from None
    resume_step = int(ck.name.split("_")[-1]) if ck is not None else None
    auto_cache = None
    if cfg.cache_dir is None and cfg.epochs != 1:  # epochs None usually means several (train_sae decides)
        auto_cache = Path(cfg.checkpoint_dir) / "activation_cache"
    return resume_step, auto_cache


def _load_model(args: argparse.Namespace, cfg: TrainConfig) -> LoadedEncoder:
    """The encoder on cfg.device (default cuda when available), with the hook checked against it."""
    loaded = load_encoder(args.model, args.encoder)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded.encoder.to(cfg.device)
    try:
        resolve(loaded.encoder, cfg.hook, loaded.penultimate_output)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--hook {cfg.hook!r} does not fit --model {args.model!r}: {e}") from None
    cfg.encoder_name = loaded.name
    cfg.penultimate_output = loaded.penultimate_output
    return loaded


def _train(loaded: LoadedEncoder, prompts: list[str], cfg: TrainConfig) -> tuple[SAE, TrainReport]:
    """train_sae (which caches activations for epochs > 1), with a hint on Ctrl-C when a rerun can resume."""
    try:
        return train_sae(loaded.encoder, loaded.tokenizer, prompts, config=cfg, return_report=True)
    except SettingError as e:  # e.g. --n-latents too large for the device's memory (checked before allocating)
        raise UsageError(_flag_message(e)) from None
    except KeyboardInterrupt:
        if cfg.checkpoint_dir:
            print(f"interrupted: rerun the same command to resume from the last checkpoint in {cfg.checkpoint_dir}",
                  file=sys.stderr)
        raise


def _write_outputs(args: argparse.Namespace, cfg: TrainConfig, loaded: LoadedEncoder, prompts: list[str],
                   out: Path, sae: SAE, rep: TrainReport, t_start: float) -> None:
    """The SAE, train_report.json (report + every setting + the arguments) and train_curves.png. The
    report is checked to be strict JSON before anything is written."""
    record = rep.to_dict()
    if rep.window == 0:  # no step measured (a checkpoint from before reports were saved in it): null, not NaN
        record.update(fvu=None, l0=None, aux_loss=None)
    record["config"] = dataclasses.asdict(cfg)
    record["settings"] = {
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "model": args.model, "encoder": loaded.name, "prompts_file": str(args.prompts_file),
        "column": args.column, "limit": args.limit, "n_prompts": len(prompts), "out": str(out),
    }
    record["wall_s"] = time.perf_counter() - t_start
    text = json_text(record)  # a NaN / inf raises here, naming the key, before the SAE is written
    out.mkdir(parents=True, exist_ok=True)
    sae.save(str(out))
    atomic_write_text(out / "train_report.json", text)
    if rep.history:
        training_curves(rep.history, out / "train_curves.png",
                        f"{loaded.name}: n {cfg.n_latents}, k {cfg.k}, hook {cfg.hook}, {len(prompts)} prompts")


def _print_summary(args: argparse.Namespace, out: Path, rep: TrainReport, auto_cache: Optional[Path]) -> None:
    resumed = f", resumed at step {rep.resumed_from_step}" if rep.resumed_from_step is not None else ""
    means = (f"FVU (mean of the last {rep.window} steps) {rep.fvu:.4f}, L0 (same steps) {rep.l0:.1f}" if rep.window
             else "FVU and L0 not measured (the checkpoint holds no per-step metrics)")
    print(f"trained {rep.steps} steps on {rep.tokens} tokens ({rep.tokens_per_s:.0f} tokens/s over "
          f"{rep.elapsed_s:.1f} s of training{resumed}): {means}, dead fraction (at the end) {rep.dead_fraction:.4f}")
    if rep.heldout_fvu is not None:
        print(f"held-out FVU {rep.heldout_fvu:.4f} on {rep.heldout_tokens} tokens of {rep.heldout_prompts} prompts "
              "never trained on")
    curves = " and train_curves.png" if rep.history else ""
    print(f"wrote the SAE (config.json, sae.safetensors), train_report.json{curves} to {out}")
    if auto_cache is not None and auto_cache.is_dir():
        size = sum(f.stat().st_size for f in auto_cache.rglob("*") if f.is_file())
        print(f"the activation cache {auto_cache} ({size / 2**30:.2f} GiB) is kept for resuming; delete it "
              "when you no longer need the checkpoint")
    print(f"next: snce-fast scan --model {shlex.quote(args.model)} --sae {shlex.quote(str(out))} "
          "--group concept=CONCEPT.csv --group reference=ORDINARY.csv --out stats/")


def cmd_train(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    cfg = build_config(args)
    out = Path(args.out)
    prompts = _read_corpus(args, out)
    locks = [out]
    if cfg.checkpoint_dir:
        _writable(Path(cfg.checkpoint_dir), "--checkpoint-dir")
        locks.append(Path(cfg.checkpoint_dir))
    with contextlib.ExitStack() as held:
        for path in locks:  # a second run on the same --out or --checkpoint-dir fails at once
            held.enter_context(output_lock(path))
        resume_step, auto_cache = _plan_checkpoints(cfg)
        loaded = _load_model(args, cfg)
        if not args.quiet:
            resuming = f"; resuming from {cfg.checkpoint_dir} at step {resume_step}" if resume_step is not None else ""
            print(f"training an SAE (n {cfg.n_latents}, k {cfg.k}, hook {cfg.hook}) on {len(prompts)} prompts of "
                  f"{args.prompts_file} with {loaded.name}{resuming}", file=sys.stderr)
        sae, rep = _train(loaded, prompts, cfg)
        _write_outputs(args, cfg, loaded, prompts, out, sae, rep, t_start)
    if not args.quiet:
        _print_summary(args, out, rep, auto_cache)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a TopK SAE on a text encoder's token embeddings (step 1)",
        description="Reads a prompt corpus (--prompts-file: .txt/.csv/.jsonl/.parquet) and a text encoder "
        "(--model), streams the prompts' token activations at --hook through a shuffle buffer and trains a "
        "TopK SAE (normalised MSE + AuxK, unit-norm decoder rows, Adam with warm-up). Writes --out DIR: "
        "config.json + sae.safetensors (the SAE), train_report.json (FVU, L0, dead fraction, tokens/s, "
        "every setting, per-step history) and train_curves.png. With --checkpoint-dir a rerun of the same "
        "command resumes from the last checkpoint there (Ctrl-C loses at most --checkpoint-every steps). "
        "Next step: snce-fast scan.",
        epilog="example: snce-fast train --model minilm --prompts-file coco_30k.csv --limit 20000 --n-latents 4096 "
        "--k 32 --out my_sae/",
    )
    add_model_args(p)
    p.add_argument("--prompts-file", required=True, help="training corpus: .txt (a prompt a line), .csv / "
                   ".jsonl / .parquet (the --column column)")
    p.add_argument("--column", default="prompt", help="prompt column of a csv/jsonl/parquet corpus (default prompt)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts of the corpus")
    p.add_argument("--hook", default="output", help="'output' (the tensor the pipeline consumes, default) or "
                   "'layer:N' (residual stream after block N)")
    p.add_argument("--n-latents", type=int, default=4096, help="SAE width n (default 4096)")
    p.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per optimiser step (default 4096)")
    p.add_argument("--prompt-batch-size", type=int, default=64, help="at most this many prompts per encoder call "
                   "(default 64)")
    p.add_argument("--token-budget", type=int, default=TOKEN_BUDGET, help="at most this many padded tokens per "
                   f"encoder call (prompts are sorted by length first; default {TOKEN_BUDGET})")
    p.add_argument("--epochs", type=int, default=None, help="passes over the corpus (later ones replay cached "
                   "activations; default: enough to train --train-tokens tokens, at most 100)")
    p.add_argument("--train-tokens", type=int, default=TrainConfig.train_tokens, help="the tokens a run without "
                   f"--epochs aims for (default {TrainConfig.train_tokens:,})")
    p.add_argument("--holdout", type=float, default=TrainConfig.holdout, help="share of the corpus held out for "
                   f"the final FVU (every 1/holdout-th prompt, at most 2000; 0: none; default {TrainConfig.holdout})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4 / sqrt(n / 2^14))")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear LR warm-up steps (default: 5%% of "
                   "the run's steps, at most 1000)")
    p.add_argument("--max-length", type=int, default=None, help="truncate prompts to this many tokens (default: "
                   "the tokenizer's limit, 77 for CLIP); batches are padded to their longest prompt")
    p.add_argument("--dead-tokens", type=int, default=10_000_000, help="a latent is dead after this many tokens "
                   "without firing (AuxK trains dead latents; default 10M)")
    p.add_argument("--cache-dir", default=None, help="activation cache for epochs > 1 (default: "
                   "CHECKPOINT_DIR/activation_cache, else a temporary directory removed at the end)")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here; if it already holds one, "
                   "training resumes from it (same settings and corpus required)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
    p.add_argument("--log-every", type=int, default=1, help="history entry in train_report.json every N steps")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other TrainConfig setting, e.g. "
                   "--set aux_k=256 --set b_dec_init=mean (repeatable)")
    p.add_argument("--out", required=True, help="directory for the trained SAE and its report")
    p.add_argument("--overwrite", action="store_true", help="replace an SAE already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_train)
