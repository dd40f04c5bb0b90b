"""Failure classification and retry backoff (pure: no I/O)."""

from __future__ import annotations

import random

from app.domain.states import ErrorKind

DEFAULT_MIN_BACKOFF = 2.0  #: seconds before the first infrastructure retry
DEFAULT_MAX_BACKOFF = 300.0  #: backoff never grows past this


def infra_backoff(
    attempt: int,
    *,
    base: float = DEFAULT_MIN_BACKOFF,
    cap: float = DEFAULT_MAX_BACKOFF,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with jitter for the ``attempt``-th failure (1-based).

    The draw between half and all of the exponential bound spreads the retries of many jobs
    that failed together (the database blinked) while keeping a floor under each wait.
    """
    bound = min(cap, base * 2.0 ** max(attempt - 1, 0))
    draw = float((rng or random).uniform(0.5, 1.0))
    return float(bound * draw)


def is_retryable(kind: ErrorKind) -> bool:
    """Whether a whole new attempt may follow a failure of this kind."""
    return kind in (ErrorKind.INFRA, ErrorKind.LOST_WORKER)


def next_micro_batch(micro_batch: int) -> int | None:
    """The micro-batch to try after an out-of-memory error, or None when 1 already failed."""
    if micro_batch <= 1:
        return None
    return micro_batch // 2


def accumulation_for(batch_size: int, micro_batch: int) -> int:
    """Accumulation steps that keep the effective batch equal to ``batch_size``."""
    return -(-batch_size // micro_batch)
