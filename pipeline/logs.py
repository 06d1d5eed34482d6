"""Logging is configured once, in each service's main(), with the level main() passes."""

from __future__ import annotations

import logging


def setup_logging(level: str | None = None) -> None:
    """Plain structured-enough lines at `level` (None: INFO); main() passes LogSettings().log_level."""
    logging.basicConfig(
        level=(level or "INFO").upper(),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
