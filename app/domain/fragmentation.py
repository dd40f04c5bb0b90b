"""Placement that fights fragmentation: which host a job should rather run on.

Both rules look at the free fitting devices per host (live, healthy, idle, outside any gang,
not reserved for another waiting gang) and name a better host, or None to run here. The worker
that took the wake-up then defers, briefly and boundedly (``workers.placement``), exactly like
the scarce-type deferral (``app.domain.scarcity``): no central scheduler decides, and the lease
still decides who runs the job, once.

- **Single-GPU jobs keep gang-sized holes open** (:func:`single_defers_to`): a single-GPU job
  on a host whose free fitting devices could hold a gang of ``gang_size`` prefers a host whose
  free fitting devices could not (1 to ``gang_size - 1`` free): taking a device there breaks
  up no gang's room. ``gang_size`` is the smallest ``gpu_count`` of the gang jobs that fit the
  device and are queued now or were submitted within ``GANG_WINDOW_S`` (the "typical" gang);
  with no such gang nothing defers.
- **Gangs fit tightly** (:func:`gang_defers_to`): a gang of N on a host with more than N free
  fitting devices prefers the host with the fewest free devices that still holds N (a gang of
  2 goes to the host with 2 free, not to the one with 4), so the big host stays whole for a
  bigger gang.

Ties go to the host name, so every worker picks the same one.
"""

from __future__ import annotations

from collections.abc import Mapping

#: how far back a submitted gang still counts as "typical" for the single-GPU rule (seconds).
GANG_WINDOW_S = 3600


def single_defers_to(free: Mapping[str, int], here: str, gang_size: int | None) -> str | None:
    """The host a single-GPU job should go to instead of ``here``, or None.

    ``here`` counts its own device among its free ones. It defers only when its host could hold
    the gang and another host has a free device whose taking cannot break up a gang's room."""
    if gang_size is None or gang_size < 2 or free.get(here, 0) < gang_size:
        return None
    better = [h for h, n in free.items() if h != here and 0 < n < gang_size]
    if not better:
        return None
    return min(better, key=lambda h: (free[h], h))  # best fit: fill the smallest hole first


def gang_defers_to(free: Mapping[str, int], here: str, gpu_count: int) -> str | None:
    """The host whose free count fits a gang of ``gpu_count`` more tightly than ``here``'s,
    or None (``here`` fits best, or cannot hold it at all: other rules pass it on then)."""
    mine = free.get(here, 0)
    if mine <= gpu_count:
        return None
    tighter = [h for h, n in free.items() if h != here and gpu_count <= n < mine]
    if not tighter:
        return None
    return min(tighter, key=lambda h: (free[h], h))
