"""The API's heap as the garbage collector sees it: what is there at startup stays.

A full (generation 2) collection traverses every object the collector tracks. Measured with a
loop-lag sampler under ``bench/api_load.py``: the API's imports and app (FastAPI, pydantic,
SQLAlchemy, Celery: alive as long as the process) made each full collection stop the event
loop for 85-96 ms, and 167-184 ms with 500 SSE followers connected, every ~3 s; every request
in flight waited, and such pauses were a large part of the submit and get p99. Frozen once
after startup (``gc.freeze``: CPython's permanent generation), they are no longer traversed:
full collections took 4-5 ms. The followers' own objects (~180k: each stream's coroutines,
task group and connection) still made them 80-110 ms; with young collections every 5,000 net
allocations instead of 700, the followers' run had none, and its young collections took at
most ~15 ms.
"""

from __future__ import annotations

import gc

_frozen = False
#: net allocations of container objects between young collections (CPython's default: 700).
GEN0_THRESHOLD = 5_000


def freeze_startup_heap() -> None:
    """Collect the startup garbage, freeze what is left, collect the young generation less
    often; once per process (a test process starts many apps: the first start does it)."""
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])
