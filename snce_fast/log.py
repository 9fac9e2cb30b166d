"""The package's logger: every module logs through `logging.getLogger(__name__)`, a child of the
`snce_fast` logger, so one setting controls them all (docs/api.md#logging).

The library adds no handler of its own: with Python's defaults, warnings (e.g. an importer that had to
guess an SAE's hook point) reach stderr and info messages stay silent. `set_verbosity("info")` shows
them, as `transformers.logging.set_verbosity_info()` does for transformers; an application that
configures `logging` itself (`logging.basicConfig`, its own handlers) needs nothing from here.
"""
from __future__ import annotations

import logging
from typing import Union

LOGGER_NAME = "snce_fast"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The `snce_fast` logger or one of its children (`name` is a module's `__name__`)."""
    if not isinstance(name, str) or not (name == LOGGER_NAME or name.startswith(LOGGER_NAME + ".")):
        raise ValueError(f"logger name {name!r} is not 'snce_fast' or a child of it ('snce_fast.<module>')")
    return logging.getLogger(name)


def set_verbosity(level: Union[int, str]) -> int:
    """Set the level of the `snce_fast` logger: "debug", "info", "warning" (Python's default), "error",
    "critical", or a `logging` level number. When nothing would print its records (no handler on the
    `snce_fast` logger or the root logger), a stderr handler is added to the `snce_fast` logger, so that
    "info" shows. Returns the level set."""
    if isinstance(level, bool) or not isinstance(level, (int, str)):
        raise TypeError(f"level={level!r} is a {type(level).__name__}: expected one of {sorted(_LEVELS)} or a "
                        "logging level number such as logging.INFO")
    if isinstance(level, str):
        if level.lower() not in _LEVELS:
            raise ValueError(f"level={level!r} is not a level: expected one of {sorted(_LEVELS)}")
        level = _LEVELS[level.lower()]
    elif level < 0:
        raise ValueError(f"level={level!r} is negative: expected a logging level such as logging.INFO (20)")
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    return level
