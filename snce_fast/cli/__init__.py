"""`snce-fast`: the command-line face of snce_fast.

One module per subcommand, each with `register(subparsers)`. Every subcommand checks its
inputs before heavy work and exits 2 with one clear line on bad input (flag syntax errors too:
argparse's usage block is left out, `--help` shows it); outputs are written to a temp name and
renamed, under an advisory lock on --out (snce_fast.records.lock) so two runs never write one
output. `--quiet` also silences the progress bars and logs of transformers / diffusers.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

from snce_fast.cli._common import UsageError, quiet_libraries

# order = order in --help
COMMANDS = ("demo", "info", "train", "scan", "score", "calibrate", "identify", "detect", "erase", "eval", "efficacy", "attack", "bench")


class _FlagError(Exception):
    """A flag argparse could not parse: (the parser's prog, argparse's message)."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (`snce-fast scan: error: argument --batch-size: invalid int
    value: 'x' (see snce-fast scan --help)`), returned by main() as exit code 2. Subparsers inherit it."""

    def error(self, message: str):  # type: ignore[override]
        raise _FlagError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="snce-fast",
        description="Single Neuron-based Concept Erasure for diffusion pipelines: train an SAE on a text "
        "encoder's token embeddings, find the latent that carries a concept, and suppress it.",
        epilog="Typical run: snce-fast demo (offline, real MiniLM encoder); then train -> scan -> score -> "
        "detect / erase on your own model. 'snce-fast COMMAND --help' explains each step.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _FlagError as e:
        prog, message = e.args
        print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with quiet_libraries(getattr(args, "quiet", False), getattr(args, "loads_pipeline", False)), \
                _warnings_as_lines(args.command):
            return func(args)
    except (UsageError, TypeError, ValueError, OSError) as e:
        # the library's own checks raise ValueError/TypeError naming the bad value; SNCE_FAST_DEBUG=1
        # shows the traceback instead (for bug reports)
        if os.environ.get("SNCE_FAST_DEBUG") and not isinstance(e, UsageError):
            raise
        print(f"snce-fast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"snce-fast {args.command}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _warnings_as_lines(command: str) -> Iterator[None]:
    """snce_fast's own warnings (e.g. a weak calibration) print as 'snce-fast CMD: warning: ...' lines."""
    shown = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if category.__module__.startswith("snce_fast."):
            print(f"snce-fast {command}: warning: {_one_line(Exception(str(message)))}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _one_line(e: BaseException) -> str:
    """The error's message on one line (a library message may quote a multi-line value)."""
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
