"""`snce-fast`: the command-line face of snce_fast.

One module per subcommand, each with `register(subparsers)`. Every subcommand checks its
inputs before heavy work and exits 2 with one clear line on bad input; outputs are written
to a temp name and renamed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Optional, Sequence

from snce_fast.cli._common import UsageError

# order = order in --help
COMMANDS = ("demo", "info", "train", "scan", "score", "calibrate", "detect", "erase", "eval", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UsageError, TypeError, ValueError, OSError) as e:
        # the library's own checks raise ValueError/TypeError naming the bad value; SNCE_FAST_DEBUG=1
        # shows the traceback instead (for bug reports)
        if os.environ.get("SNCE_FAST_DEBUG") and not isinstance(e, UsageError):
            raise
        print(f"snce-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"snce-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
