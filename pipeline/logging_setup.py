"""Logging for command-line entry points.

Some imported libraries install a root handler (with the root level at ERROR) at import time,
which turns ``logging.basicConfig`` into a no-op; the project's loggers are therefore set to INFO
themselves, and their records reach whichever root handler exists.
"""

from __future__ import annotations

import logging

PROJECT_LOGGERS = ("experiments", "pipeline", "benchmarks", "analysis")


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
