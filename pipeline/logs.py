"""Logging is configured once, in each service's main()."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    """Plain structured-enough lines; FACEMATCH_LOG_LEVEL overrides the level."""
    logging.basicConfig(
        level=(level or os.environ.get("FACEMATCH_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
