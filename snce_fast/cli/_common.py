"""Shared pieces of the `snce-fast` subcommands: the one-line usage error, checks of the flags' own
syntax, atomic writes, loading an SAE, reading prompts, and loading a text encoder + tokenizer from a
model spec. Checks of the values themselves live in the library (snce_fast.checks, snce_fast.records,
snce_fast.hooks.compat): their ValueError/TypeError is printed as one line by snce_fast.cli.main."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from snce_fast.checks import check_edit_args, unique_neurons
from snce_fast.hooks.activations import check_length_limits
from snce_fast.hooks.batching import TOKEN_BUDGET
from snce_fast.hooks.compat import check_erasure_edit
from snce_fast.models import EMBEDDED_MODEL, encoder_limits, hub_id_like, load_encoder, load_pipeline  # noqa: F401
from snce_fast.records.atomic import atomic_save_image, atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)
from snce_fast.records.calibration import read_calibration
from snce_fast.records.lock import output_lock  # noqa: F401  (re-exported)
from snce_fast.sae import load_pretrained
from snce_fast.sae.hub import split_hub_spec
from snce_fast.sae.fingerprint import sae_hash
from snce_fast.workflow import pairs as pairs_lib
from snce_fast.workflow.corpus import SKIP_REASONS, PromptFile, read_prompts, skips_before_a_prompt


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def parse_neurons(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--neurons {text!r}: expected comma-separated latent indices, e.g. 1234 or 12,34") from None
    if not out:
        raise UsageError(f"--neurons {text!r}: expected at least one latent index")
    return out


def check_neurons(neurons: list[int], n_latents: int, what: str = "the SAE") -> list[int]:
    """--neurons against an SAE's latents (snce_fast.checks.unique_neurons): the distinct neurons, in
    the order given."""
    try:
        return unique_neurons(neurons, n_latents)
    except ValueError as e:
        raise UsageError(f"--neurons: {e} ({what})") from None


def existing_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{what} {path!r} is not a directory")
    return p


def existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {path!r} does not exist (or is not a file)")
    return p


def load_sae(path: str, what: str = "--sae"):
    """A local SAE directory in any layout snce_fast reads (native, slim erasure, SAELens, sparsify, OpenAI)
    or, when no such directory exists, a hub repo `owner/name[@revision][/subfolder]` fetched through the
    Hugging Face cache (HF_HUB_OFFLINE=1: from the cache only). A local directory always wins."""
    local = Path(path).is_dir()
    if not local and (not hub_id_like(path) or path.startswith("~")):
        raise UsageError(f"{what} {path!r} is not a directory (nor a hub repo id such as owner/name)")
    try:
        if local:
            return load_pretrained(path)
        repo, subfolder, revision = split_hub_spec(path)
        return load_pretrained(repo, subfolder, revision)
    except (ValueError, FileNotFoundError) as e:
        where = "" if local else "no such local directory; as a hub repo: "
        raise UsageError(f"{what} {path!r}: {where}{e}") from None


def apply_threads(threads: Optional[int]) -> None:
    """--threads N: torch's CPU threads (None leaves torch's default)."""
    if threads is None:
        return
    positive(threads, "--threads")
    torch.set_num_threads(threads)


def positive(value: Optional[int], flag: str, multiple: int = 1) -> None:
    if value is not None and (value < 1 or value % multiple):
        what = f"a positive multiple of {multiple}" if multiple > 1 else "a positive integer"
        raise UsageError(f"{flag} {value}: expected {what}")


def require_sae_per_encoder(kind: str, n_encoders: int, saes: dict[str, Any]) -> None:
    """erase and eval erase from every text encoder: SDXL's second one needs its own --sae-2."""
    if n_encoders > 1 and "text_encoder_2" not in saes:
        raise UsageError(f"{kind} has two text encoders: give --sae for text_encoder and --sae-2 for text_encoder_2")


def check_local_pipeline(path: Path, saes: dict[str, Any]) -> None:
    """Encoders and widths of a local pipeline from its JSON files, before loading any weights."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UsageError(f"--model {str(path)!r}: no model_index.json (expected a diffusers pipeline directory)")
    try:
        index = json.loads(index_file.read_text())
    except ValueError:
        raise UsageError(f"--model {str(path)!r}: model_index.json is not valid JSON") from None
    has = {name for name in ("text_encoder", "text_encoder_2") if (index.get(name) or [None])[0]}
    kind = index.get("_class_name", "the pipeline")
    require_sae_per_encoder(kind, len(has), saes)
    if "text_encoder_2" in saes and "text_encoder_2" not in has:
        raise UsageError(f"--sae-2: {kind} has a single text encoder")
    for name, sae in saes.items():
        try:
            width = json.loads((path / name / "config.json").read_text()).get("hidden_size")
        except (OSError, ValueError):
            continue  # the loader will say what is wrong
        if isinstance(width, int) and width != sae.d_in:
            flag = "--sae-2" if name == "text_encoder_2" else "--sae"
            raise UsageError(f"{flag}: the SAE has d_in={sae.d_in} but {name}'s hidden size is {width}")


def check_pipeline_arg(model: str, saes: dict[str, Any]) -> None:
    """--model names a local diffusers pipeline (checked against the SAEs from its JSON files, no
    weights loaded) or looks like a hub id."""
    if Path(model).exists():
        check_local_pipeline(Path(model), saes)
    elif not hub_id_like(model):
        raise UsageError(f"--model {model!r}: no such local directory (or give a hub id like org/name)")


def add_edit_args(p: argparse.ArgumentParser) -> None:
    """The edit and gate options of erase / eval (what patch() takes), incl. --calibration."""
    p.add_argument("--neurons", default=None, help="latent indices, comma-separated (or --calibration)")
    p.add_argument("--calibration", default=None, help="calibration.json from snce-fast calibrate: its neurons, "
                   "with the gate on at their calibrated per-neuron thresholds and min_tokens (the measured best rule)")
    p.add_argument("--scale", type=float, default=0.0, help="z_j <- scale * z_j (0 removes; default 0)")
    p.add_argument("--clamp", type=float, default=None, help="z_j <- min(z_j, clamp) instead of scaling")
    p.add_argument("--mode", choices=("residual", "reconstruct"), default="residual",
                   help="residual (default): add only the change of the target latents, every other token stays "
                   "bit-identical; reconstruct: replace the hidden state by the SAE's reconstruction")
    p.add_argument("--gate", action="store_true", help="edit a prompt only if a target fires (activation > "
                   "--gate-threshold) on >= --min-tokens of its tokens")
    p.add_argument("--gate-threshold", type=float, default=0.0, help="the gate's activation threshold (default 0)")
    p.add_argument("--min-tokens", type=int, default=1, help="with --gate: counted tokens a target must fire on "
                   "for the prompt to be edited (default 1)")


def apply_calibration(args: argparse.Namespace, sae: Any) -> None:
    """--calibration FILE sets --neurons, --gate, --gate-threshold and --min-tokens from the file."""
    if not getattr(args, "calibration", None):
        if not args.neurons:
            raise UsageError("give --neurons J[,J...] or --calibration calibration.json")
        return
    if args.neurons:
        raise UsageError("give --neurons or --calibration (which holds the neurons), not both")
    record = read_calibration(args.calibration, sae_hash(sae), sae.n_latents)
    args.neurons = ",".join(str(j) for j in record["neurons"])
    args.gate = True
    args.gate_threshold = [float(t) for t in record["thresholds"]]  # one per neuron, in record["neurons"] order
    args.min_tokens = record["min_tokens"]


def edit_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(scale=args.scale, clamp=args.clamp, mode=args.mode, gate=args.gate, min_tokens=args.min_tokens,
                threshold=args.gate_threshold)


def check_edit_options(args: argparse.Namespace) -> None:
    """--scale/--clamp/--mode/--min-tokens as patch() will check them, before anything is loaded."""
    positive(args.min_tokens, "--min-tokens")
    gate_thr = args.gate_threshold if isinstance(args.gate_threshold, list) else [args.gate_threshold]
    for flag, value in (("--scale", args.scale), ("--clamp", args.clamp), *(("--gate-threshold", t) for t in gate_thr)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} {value}: expected a finite number")
    try:
        check_edit_args(args.mode, args.scale, args.clamp)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_out_dir(path: str, expected: str = "a directory (it is created if missing)") -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path!r} is a file: expected {expected}")
    return out


def check_out_file(path: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"--out {path!r} is a directory: expected a file path")
    return out


def check_slim_mode(saes: dict, mode: str, neurons: Any = None) -> None:
    """A slim erasure (ErasureSAE) supports residual mode only, and only the latents whose decoder rows
    it stores (`neurons`: a list, or a dict per encoder): say so before any heavy loading
    (snce_fast.hooks.compat.check_erasure_edit)."""
    for name, sae in saes.items():
        wanted = neurons.get(name, []) if isinstance(neurons, dict) else (neurons or [])
        check_erasure_edit(sae, mode, wanted, name)


def add_batching_args(p: argparse.ArgumentParser) -> None:
    """--batch-size and --token-budget of the corpus passes (snce_fast.hooks.batching)."""
    p.add_argument("--batch-size", type=int, default=64, help="at most this many prompts per encoder call (default 64)")
    p.add_argument("--token-budget", type=int, default=TOKEN_BUDGET, help="at most this many padded tokens per "
                   f"encoder call; prompts are sorted by length first (default {TOKEN_BUDGET})")


def add_prompt_file_args(p: argparse.ArgumentParser) -> None:
    """--prompt (repeatable), --prompts-file and --column, as read by read_prompts_arg."""
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="prompts: .txt (one per line), .csv/.jsonl/.parquet (column --column)")
    p.add_argument("--column", default="prompt", help="prompt column of a csv/jsonl/parquet --prompts-file")


def read_prompts_arg(args: argparse.Namespace, skipped: Optional[dict[str, int]] = None) -> list[str]:
    """Prompts from --prompt (repeatable) and --prompts-file (txt/csv/jsonl/parquet); the rows of the file
    that were skipped are added up by reason into `skipped` when given."""
    prompts = list(getattr(args, "prompt", None) or [])
    skipped = skipped if skipped is not None else {}
    column = getattr(args, "column", "prompt")
    if getattr(args, "prompts_file", None):
        prompts += read_prompt_file(args.prompts_file, "--prompts-file", column, skipped=skipped)
    if not prompts and getattr(args, "prompts_file", None):
        raise UsageError(f"--prompts-file {args.prompts_file!r} has no usable prompts "
                         f"({skip_summary(skipped, column) or 'no rows'})")
    if not prompts:
        raise UsageError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def read_prompt_file(path: str, what: str, column: str = "prompt", limit: Optional[int] = None,
                     skipped: Optional[dict[str, int]] = None) -> list[str]:
    """All usable prompts of a corpus file (at most `limit`); the rows the corpus reader skips (blank,
    undecodable, malformed: snce_fast.workflow.corpus.SKIP_REASONS) are counted into `skipped` by reason
    when given. Bad files are UsageErrors."""
    existing_file(path, what)
    try:
        return read_prompts(path, column, limit, skipped=skipped)
    except (ValueError, KeyError) as e:
        raise UsageError(f"{what} {path!r}: {e}") from None


def read_required_prompts(path: str, flag: str, column: str, expected: str = "at least 1") -> list[str]:
    """The prompts of one prompt-file flag; a file with none is a UsageError naming its skipped rows and
    `expected` (what the command needs, e.g. "at least 2")."""
    skipped: dict[str, int] = {}
    prompts = read_prompt_file(path, flag, column, skipped=skipped)
    if not prompts:
        raise UsageError(f"{flag} {path!r} has no usable prompts ({skip_summary(skipped, column) or 'no rows'}): "
                         f"expected {expected}")
    return prompts


def read_pair_file(path: str, what: str = "--pairs") -> list[tuple[str, str]]:
    """(concept, neutral) rows of a pair file (snce_fast.workflow.pairs.read_pairs); its skipped rows are
    reported as one line on stderr, a file without a valid pair is a UsageError."""
    skipped: dict[str, int] = {}
    try:
        pairs = pairs_lib.read_pairs(path, skipped=skipped, what=what)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if pairs_lib.skip_summary(skipped):
        print(f"{what} {path}: {pairs_lib.skip_summary(skipped)}", file=sys.stderr)
    return [(p.concept, p.neutral) for p in pairs]


def skipped_before_a_prompt(path: str, what: str, column: str = "prompt") -> Optional[dict[str, int]]:
    """None when a corpus file holds a usable prompt (read only up to the first one), else its skipped rows
    by reason. A missing or unreadable file is a UsageError."""
    existing_file(path, what)
    try:
        return skips_before_a_prompt([PromptFile(path, column)])
    except (ValueError, KeyError) as e:
        raise UsageError(f"{what} {path!r}: {e}") from None


# how each skip reason of the corpus reader (snce_fast.workflow.corpus.SKIP_REASONS) reads in a summary
# ("2 malformed", "1 without 'prompt'"); any other reason it adds is shown by its name
_SKIP_WORDS = {"blank": "blank", "undecodable": "not UTF-8", "malformed": "malformed"}


def skip_summary(skipped: dict[str, int], column: str = "prompt") -> str:
    """'3 rows skipped: 2 malformed, 1 blank' (reasons in SKIP_REASONS order); '' when none were."""
    total = sum(skipped.values())
    if not total:
        return ""
    order = list(SKIP_REASONS) + sorted(r for r in skipped if r not in SKIP_REASONS)
    words = {**_SKIP_WORDS, "no_column": f"without {column!r}"}
    parts = [f"{skipped[r]} {words.get(r, str(r).replace('_', ' '))}" for r in order if skipped.get(r)]
    return f"{total} row{'s' if total != 1 else ''} skipped: " + ", ".join(parts)


def finite(value: Optional[float], flag: str) -> None:
    """A float flag must be a finite number (NaN or inf would silently give wrong results)."""
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{flag} {value}: expected a finite number")


@contextlib.contextmanager
def quiet_libraries(quiet: bool, pipelines: bool = False) -> Iterator[None]:
    """With --quiet: no transformers progress bars (weight loading) or info/warning logs for the block,
    and with `pipelines` none of diffusers' either ('Loading pipeline components'); the libraries'
    settings come back afterwards."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    libraries = [hf_logging]
    if pipelines:
        with contextlib.suppress(ImportError):
            from diffusers.utils import logging as df_logging

            libraries.append(df_logging)
    restore = [(lib, lib.is_progress_bar_enabled(), lib.get_verbosity()) for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib, bar, verbosity in restore:
            (lib.enable_progress_bar if bar else lib.disable_progress_bar)()
            lib.set_verbosity(verbosity)


def check_max_length_arg(args: argparse.Namespace) -> None:
    """--max-length against the --model's positions and tokenizer limit, read from its config files before
    any weights are loaded (checked again on the loaded encoder: snce_fast.hooks.activations.check_max_length)."""
    positions, tokenizer_max = encoder_limits(args.model, args.encoder)
    check_length_limits(args.max_length, positions, tokenizer_max, repr(args.model))


def add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", default=None if required else EMBEDDED_MODEL, required=required,
                   help=f"text encoder: {EMBEDDED_MODEL!r} (the embedded real MiniLM, default), a diffusers pipeline "
                        "dir, a transformers model dir, or a hub id")
    p.add_argument("--encoder", default="text_encoder", choices=("text_encoder", "text_encoder_2"),
                   help="which encoder of a pipeline (SDXL has two)")
