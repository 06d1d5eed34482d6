"""Error kinds the shared runner understands.

Stage cores raise these; the runner decides: poison goes to the dead-letter
topic at once, transient is retried with backoff and then dead-lettered.
"""

from __future__ import annotations


class PoisonRecord(Exception):
    """The record can never succeed (undecodable, invalid, unsafe URL...).

    `reason` is a short stable code (e.g. "invalid_embedding", "fetch_blocked")
    that lands in the DLQ headers; the message is for humans.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TransientError(Exception):
    """The record may succeed later (timeout, HTTP 5xx, broker hiccup)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
