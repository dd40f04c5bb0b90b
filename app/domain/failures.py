"""How a failed trainer ended: one table from error text to a failure class (pure: no I/O).

A trainer's exception (its class names and message) or, for a command, the last lines of its
stderr, are matched against :data:`PATTERNS` in order; the first row that matches decides:

- ``oom``: out of memory; the supervisor halves the micro-batch and tries again;
- ``infra``: not the user's fault; retried with backoff on a new attempt. Rows with
  ``device_suspect`` are GPU hardware or driver faults (Xid, ECC, a lost GPU, a launch
  failure, NCCL's CUDA errors): the supervisor also marks the device suspect, and no job starts
  on it until its keeper's health check passes (``workers.claim.DeviceKeeper``);
- ``user_error``: the spec or the user's code is wrong; never retried.

Nothing matches: ``user_error``, as an exception in user code is the common case.

The trainer's ``UserError`` comes first: its message quotes the user's paths and names. Two
rows are there to be read before the broader ones below them: a device-side assert is the
user's kernel (an index out of range), not the GPU; and NCCL's "invalid usage" is a wrong call,
not a broken link. "an illegal memory access" can be either a bad custom kernel or failing
memory; it is treated as hardware (the device is checked, and the retry budget bounds a user
bug that keeps causing it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

FailureKind = Literal["oom", "user_error", "infra"]

#: how much of a command's stderr is searched (its last lines hold the error).
STDERR_TAIL_LINES = 50


@dataclass(frozen=True)
class Pattern:
    """One row of the table: matches an exception class name or a regular expression."""

    kind: FailureKind
    device_suspect: bool
    why: str
    #: class names matched anywhere in the exception's MRO (``OSError`` covers its subclasses).
    types: frozenset[str] = frozenset()
    #: searched (case-insensitive) in the message and the stderr tail.
    text: re.Pattern[str] | None = None

    def matches(self, type_names: frozenset[str], haystack: str) -> bool:
        if self.types & type_names:
            return True
        return self.text is not None and self.text.search(haystack) is not None


def _row(
    kind: FailureKind,
    why: str,
    *,
    suspect: bool = False,
    types: Iterable[str] = (),
    text: str | None = None,
) -> Pattern:
    return Pattern(
        kind=kind,
        device_suspect=suspect,
        why=why,
        types=frozenset(types),
        text=None if text is None else re.compile(text, re.IGNORECASE),
    )


PATTERNS: tuple[Pattern, ...] = (
    # -- the trainer's own verdict: its message may quote user text (paths, names) ----------
    _row(
        "user_error",
        "the trainer found the spec, its data or the user's code wrong",
        types=("UserError",),
    ),
    # -- the user's code, in words that also appear in hardware errors: read first ---------
    _row(
        "user_error",
        "a device-side assert is the user's kernel failing a check (an index out of range)",
        text=r"device-side assert(ion)? triggered",
    ),
    _row(
        "user_error",
        "NCCL invalid usage/argument: the collective was called wrongly",
        text=r"ncclInvalidUsage|ncclInvalidArgument",
    ),
    # -- out of memory ----------------------------------------------------------------------
    _row(
        "oom",
        "the framework's own out-of-memory error (torch, TensorFlow), or the host's",
        types=("OutOfMemoryError", "ResourceExhaustedError", "MemoryError"),
    ),
    _row(
        "oom",
        "CUDA, cuBLAS or cuDNN could not allocate GPU memory",
        text=r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED"
        r"|CUDNN_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC",
    ),
    _row(
        "oom",
        "TensorFlow/XLA ran out of device memory",
        text=r"OOM when allocating|RESOURCE_EXHAUSTED: Out of memory"
        r"|(^|\n)\s*(torch\.)?OutOfMemoryError\b|(^|\n)\s*MemoryError\b",
    ),
    # -- the GPU or its driver: infra, and the device is suspect ----------------------------
    _row(
        "infra",
        "the driver logged an Xid (a hardware or driver fault)",
        suspect=True,
        text=r"(?-i:\bXid\b)",
    ),
    _row(
        "infra",
        "an uncorrectable (ECC, NVLink) error: the GPU's memory or links are failing",
        suspect=True,
        text=r"\buncorrectable\b",
    ),
    _row(
        "infra",
        "the GPU fell off the bus or is lost; it needs a reset",
        suspect=True,
        text=r"GPU is lost|fallen off the bus",
    ),
    _row(
        "infra",
        "an illegal memory access or launch failure leaves the CUDA context unusable; "
        "the device is checked before it runs anything else",
        suspect=True,
        text=r"an illegal memory access was encountered|unspecified launch failure"
        r"|illegal instruction was encountered|CUDA error: misaligned address",
    ),
    _row(
        "infra",
        "the device is held by another process, in an exclusive mode, or not visible",
        suspect=True,
        text=r"CUDA-capable device\(s\) (is/are|is|are) busy or unavailable"
        r"|no CUDA-capable device is detected",
    ),
    _row(
        "infra",
        "NCCL failed below the user's code (system, CUDA or internal error)",
        suspect=True,
        text=r"NCCL error|ncclSystemError|ncclUnhandledCudaError|ncclInternalError",
    ),
    # -- the gang's rendezvous --------------------------------------------------------------
    _row(
        "infra",
        "torch.distributed could not meet on the gang's port (taken by another process between "
        "its choice and rank 0's bind): the next attempt meets on another",
        types=("DistNetworkError",),
        text=r"DistNetworkError|EADDRINUSE|address already in use",
    ),
    # -- declared by the trainer or the OS ----------------------------------------------------
    _row(
        "infra",
        "I/O or the OS failed (disk, network, an injected transient fault); a retry may work",
        types=("OSError",),
    ),
)

DEFAULT = Pattern(
    kind="user_error",
    device_suspect=False,
    why="an exception in the spec's training code; retrying will not change it",
)


@dataclass(frozen=True)
class Classified:
    kind: FailureKind
    device_suspect: bool
    why: str


def classify(
    *, type_names: Iterable[str] = (), message: str = "", stderr_tail: str = ""
) -> Classified:
    """The first row of :data:`PATTERNS` that the failure matches, or :data:`DEFAULT`.

    ``type_names``: the exception's class and its bases (``type(exc).__mro__`` names);
    ``message``: its text; ``stderr_tail``: the last output of a command (only its last
    :data:`STDERR_TAIL_LINES` lines are read).
    """
    names = frozenset(type_names)
    tail = "\n".join(stderr_tail.splitlines()[-STDERR_TAIL_LINES:])
    haystack = f"{message}\n{tail}"
    row = next((p for p in PATTERNS if p.matches(names, haystack)), DEFAULT)
    return Classified(kind=row.kind, device_suspect=row.device_suspect, why=row.why)


def classify_exception(exc: BaseException) -> Classified:
    """:func:`classify` for a raised exception (its MRO names and ``str``)."""
    names = (cls.__name__ for cls in type(exc).__mro__)
    return classify(type_names=names, message=f"{type(exc).__name__}: {exc}")
