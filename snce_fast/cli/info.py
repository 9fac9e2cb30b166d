"""`snce-fast info`: which backends were built and which one each device uses."""
from __future__ import annotations

import argparse
from typing import Any

from snce_fast.info import report


def cmd_info(args: argparse.Namespace) -> int:
    print(report())
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="which backends were built and which one each device uses")
    p.set_defaults(func=cmd_info)
