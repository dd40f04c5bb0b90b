"""When a device lets a job go to a more plentiful GPU type (``app.domain.scarcity``)."""

from __future__ import annotations

import pytest

from app.domain.scarcity import LiveDevice, defer_to, fitting_types


def fleet(*spec: tuple[str, float, int, int]) -> list[LiveDevice]:
    """(type, GiB, idle count, busy count) per type."""
    devices = []
    for gpu_type, gib, idle, busy in spec:
        devices += [LiveDevice(gpu_type, gib, idle=True) for _ in range(idle)]
        devices += [LiveDevice(gpu_type, gib, idle=False) for _ in range(busy)]
    return devices


# one scarce A100 among many T4s; a small "any" job
MIXED = fleet(("A100", 80, 1, 0), ("T4", 15, 2, 4))


@pytest.mark.parametrize(
    ("case", "my_type", "job_types", "memory_gb", "devices", "expected"),
    [
        ("scarce type, plentiful idle", "A100", ["any"], 8, MIXED, "T4"),
        ("the plentiful type itself runs it", "T4", ["any"], 8, MIXED, None),
        (
            "plentiful type all busy",
            "A100",
            ["any"],
            8,
            fleet(("A100", 80, 1, 0), ("T4", 15, 0, 6)),
            None,
        ),
        ("plentiful type does not fit the memory", "A100", ["any"], 40, MIXED, None),
        ("a list that leaves the plentiful type out", "A100", ["A100", "V100"], 8, MIXED, None),
        ("a list that includes it", "A100", ["A100", "T4"], 8, MIXED, "T4"),
        (
            "equal counts never defer (no ping-pong)",
            "A100",
            ["any"],
            8,
            fleet(("A100", 80, 1, 0), ("T4", 15, 1, 0)),
            None,
        ),
        (
            "the most plentiful idle type wins",
            "A100",
            ["any"],
            8,
            fleet(("A100", 80, 1, 0), ("L4", 22.5, 1, 2), ("T4", 15, 1, 5)),
            "T4",
        ),
        (
            "a middle type defers only upward",
            "L4",
            ["any"],
            8,
            fleet(("A100", 80, 1, 0), ("L4", 22.5, 1, 2), ("T4", 15, 1, 5)),
            "T4",
        ),
        ("type names are case-insensitive", "a100", ["ANY"], 8, MIXED, "T4"),
    ],
)
def test_defer_to(
    case: str,
    my_type: str,
    job_types: list[str],
    memory_gb: float,
    devices: list[LiveDevice],
    expected: str | None,
) -> None:
    got = defer_to(
        my_type=my_type,
        job_types=job_types,
        job_memory_gb=memory_gb,
        framework="torch",
        devices=devices,
    )
    assert got == expected, case


def test_a_type_whose_workers_lack_the_framework_is_not_a_target() -> None:
    devices = [LiveDevice("A100", 80, idle=True, frameworks=frozenset({"torch", "tensorflow"}))]
    devices += [LiveDevice("T4", 15, idle=True, frameworks=frozenset({"torch"})) for _ in range(3)]
    kwargs = {"my_type": "A100", "job_types": ["any"], "job_memory_gb": 8, "devices": devices}
    assert defer_to(framework="tensorflow", **kwargs) is None  # type: ignore[arg-type]
    assert defer_to(framework="torch", **kwargs) == "T4"  # type: ignore[arg-type]


def test_suspect_or_busy_devices_still_count_toward_rarity_but_are_not_targets() -> None:
    # 3 T4s, only one idle: T4 is still the plentiful type, and that idle one is the target
    devices = fleet(("A100", 80, 1, 0), ("T4", 15, 1, 2))
    assert (
        defer_to(
            my_type="A100", job_types=["any"], job_memory_gb=8, framework="torch", devices=devices
        )
        == "T4"
    )


def test_fitting_types() -> None:
    assert fitting_types(["any"]) is None
    assert fitting_types(["a100", "T4"]) == frozenset({"A100", "T4"})
