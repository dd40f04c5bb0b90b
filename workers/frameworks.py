"""The training frameworks this worker can run, found without importing them.

A worker reports them on its device row when it claims it and consumes only the queues of the
frameworks it has (``app.domain.routing.device_queues``). ``GPUFLEET_WORKER_FRAMEWORKS=torch``
narrows the list to a subset of what is installed: a worker whose image has TensorFlow but
whose driver or GPU it should not serve keeps TensorFlow jobs away that way.

Importing torch or TensorFlow takes seconds and may touch CUDA, which the worker's main process
must not do before it forks its job processes: ``find_spec`` says a package is importable, and
its distribution's metadata gives the version.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable, Mapping

from app.domain.routing import FRAMEWORKS

log = logging.getLogger(__name__)

FRAMEWORKS_VARIABLE = "GPUFLEET_WORKER_FRAMEWORKS"

#: distributions that install each framework's top-level package, most common first.
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel"),
}


class FrameworksError(RuntimeError):
    """GPUFLEET_WORKER_FRAMEWORKS names a framework this worker cannot import."""


def _version(framework: str) -> str:
    for dist in _DISTRIBUTIONS.get(framework, (framework,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _importable(framework: str) -> bool:
    try:
        return importlib.util.find_spec(framework) is not None
    except (ImportError, ValueError):
        return False


def installed(
    *,
    importable: Callable[[str], bool] = _importable,
    version: Callable[[str], str] = _version,
) -> dict[str, str]:
    """The known frameworks importable here, with their versions."""
    return {name: version(name) for name in FRAMEWORKS if importable(name)}


def offered(allow: str, found: Mapping[str, str]) -> dict[str, str]:
    """The frameworks this worker offers: ``found``, narrowed by ``allow`` (comma-separated
    names; blank: all of ``found``). Naming one that is not installed is an error."""
    wanted = [name.strip() for name in allow.split(",") if name.strip()]
    if not wanted:
        return dict(found)
    missing = [name for name in wanted if name not in found]
    if missing:
        have = ", ".join(found) or "none"
        raise FrameworksError(
            f"{FRAMEWORKS_VARIABLE}={allow!r}: {', '.join(missing)} cannot be imported "
            f"on this worker (installed: {have}; gpufleet runs {', '.join(FRAMEWORKS)})"
        )
    return {name: found[name] for name in wanted}
