"""The supervisor's decisions, as tables: how a run ends, and which stop reason wins."""

from __future__ import annotations

import itertools

import pytest

from app.domain import outcome as o
from app.domain.states import ErrorKind
from app.domain.stopping import StopReason, StopReasons

R = StopReason


def facts(
    stop: StopReason | None = None,
    code: int | None = o.EXIT_INFRA,
    *,
    result: bool = False,
    micro: int = 64,
    suspect: bool = False,
) -> o.RunFacts:
    return o.RunFacts(
        stop=stop,
        exit_code=code,
        has_result=result,
        micro_batch=micro,
        failure_message="boom",
        device_suspect=suspect,
    )


CASES: list[tuple[str, o.RunFacts, type, dict[str, object]]] = [
    ("lease lost beats a result", facts(R.LEASE_LOST, o.EXIT_OK, result=True), o.Abandon, {}),
    ("lease lost while failing", facts(R.LEASE_LOST, o.EXIT_USER_ERROR), o.Abandon, {}),
    ("a result", facts(None, o.EXIT_OK, result=True), o.Succeed, {}),
    ("a result beats a cancel", facts(R.CANCELLED, o.EXIT_OK, result=True), o.Succeed, {}),
    ("a result beats a drain", facts(R.DRAINING, o.EXIT_OK, result=True), o.Succeed, {}),
    ("exit 0 without a result", facts(None, o.EXIT_OK), o.Requeue, {"counted": True}),
    ("a crash in teardown after the result", facts(None, -6, result=True), o.Succeed, {}),
    (
        "device lost",
        facts(R.DEVICE_LOST, -9),
        o.Requeue,
        {"counted": True, "immediate": True},
    ),
    (
        "database unreachable",
        facts(R.DATABASE_UNREACHABLE, -9),
        o.Requeue,
        {"counted": False, "immediate": True},
    ),
    ("cancelled", facts(R.CANCELLED, o.EXIT_STOPPED), o.Cancel, {}),
    (
        "past max_runtime",
        facts(R.DEADLINE, o.EXIT_STOPPED),
        o.Fail,
        {"kind": ErrorKind.TIMEOUT},
    ),
    ("a result beats max_runtime", facts(R.DEADLINE, o.EXIT_OK, result=True), o.Succeed, {}),
    ("cancelled while failing", facts(R.CANCELLED, o.EXIT_USER_ERROR), o.Cancel, {}),
    (
        "drained at a checkpoint",
        facts(R.DRAINING, o.EXIT_STOPPED),
        o.Requeue,
        {"counted": False, "immediate": True},
    ),
    (
        "drained, failed on its own",
        facts(R.DRAINING, o.EXIT_USER_ERROR),
        o.Fail,
        {"kind": ErrorKind.USER_ERROR},
    ),
    ("out of memory", facts(None, o.EXIT_OOM, micro=64), o.Shrink, {"micro_batch": 32}),
    ("out of memory at 1", facts(None, o.EXIT_OOM, micro=1), o.Fail, {"kind": ErrorKind.OOM}),
    ("user error", facts(None, o.EXIT_USER_ERROR), o.Fail, {"kind": ErrorKind.USER_ERROR}),
    (
        "infra failure",
        facts(None, o.EXIT_INFRA),
        o.Requeue,
        {"counted": True, "immediate": False, "suspect_device": None},
    ),
    (
        "hardware fault",
        facts(None, o.EXIT_INFRA, suspect=True),
        o.Requeue,
        {"counted": True, "immediate": True, "suspect_device": "boom"},
    ),
    ("a crash (signal)", facts(None, -11), o.Requeue, {"counted": True, "immediate": False}),
]


@pytest.mark.parametrize(("case", "run", "kind", "fields"), CASES, ids=[c[0] for c in CASES])
def test_how_a_run_ends(case: str, run: o.RunFacts, kind: type, fields: dict[str, object]) -> None:
    decision = o.decide(run)
    assert isinstance(decision, kind), case
    for name, value in fields.items():
        assert getattr(decision, name) == value, (case, name)


#: the documented winner of every pair: the higher precedence, whatever order they come in.
PRECEDENCE = [
    R.LEASE_LOST,
    R.DEVICE_LOST,
    R.DATABASE_UNREACHABLE,
    R.CANCELLED,
    R.DEADLINE,
    R.DRAINING,
]


@pytest.mark.parametrize(
    ("first", "second"), list(itertools.permutations(PRECEDENCE, 2)), ids=lambda r: r.name
)
def test_of_two_stop_reasons_the_documented_one_wins_in_either_order(
    first: StopReason, second: StopReason
) -> None:
    winner = min(first, second, key=PRECEDENCE.index)
    reasons = StopReasons()
    assert reasons.observe(first)
    # the second is acted on only when it outranks the first
    assert reasons.observe(second) == (second == winner)
    assert reasons.winner == winner
    # and the run ends as the winner alone would end it
    assert o.decide(facts(reasons.winner, -9)) == o.decide(facts(winner, -9))


def test_a_reason_seen_again_changes_nothing() -> None:
    reasons = StopReasons()
    assert reasons.observe(R.CANCELLED)
    assert not reasons.observe(R.CANCELLED)
    assert not reasons.observe(R.DRAINING)
    assert reasons.winner == R.CANCELLED


def test_the_reasons_that_forbid_a_checkpoint_kill_and_the_others_ask() -> None:
    assert {r for r in StopReason if r.kills} == {
        R.LEASE_LOST,
        R.DEVICE_LOST,
        R.DATABASE_UNREACHABLE,
    }
