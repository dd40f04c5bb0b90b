"""schemathesis fuzzes the live API (real Postgres and Redis) through its own OpenAPI document:
every operation, with auth, and stateful runs that follow the document's links (submit ->
get/cancel/events/logs). No 5xx, and every response — status code, media type, headers, body —
must be what the document declares; schema-valid bodies must be accepted, and schema-invalid
requests (negative mode) refused with a documented 4xx.

Bounded: ``MAX_EXAMPLES`` per operation, so the run takes well under a minute.
"""

from __future__ import annotations

import shutil
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import text

from app.api.app import create_app
from app.db.session import session_scope
from app.settings import Settings

MAX_EXAMPLES = 50
TOKEN = {"Authorization": "Bearer alice-token"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,
]
SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)


@pytest.fixture
def api_schema(settings: Settings) -> schemathesis.schemas.BaseSchema:
    app = create_app(
        settings.model_copy(
            update={"api_tokens": "alice:alice-token", "metrics_token": "alice-metrics"}
        )
    )
    counted = _Counted(app)
    REQUESTS.clear()
    return schemathesis.openapi.from_asgi("/openapi.json", counted)


#: requests per test, printed with ``-s`` (the README quotes the figure).
REQUESTS: list[str] = []


class _Counted:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            REQUESTS.append(scope["path"])
        await self.app(scope, receive, send)


def test_every_operation_answers_as_documented(
    api_schema: schemathesis.schemas.BaseSchema,
) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @SETTINGS
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=TOKEN, checks=CHECKS)

        fuzz()
    print(f"schemathesis: {len(REQUESTS)} requests over {len(operations)} operations")


#: malformed requests: each must be refused with a documented 4xx, never a 5xx.
NEGATIVE_CHECKS = [
    not_a_server_error,
    negative_data_rejection,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_schema_invalid_requests_are_refused_with_a_documented_4xx(
    api_schema: schemathesis.schemas.BaseSchema,
) -> None:
    fuzzed = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    # The API's own operations; the probes (/healthz, /readyz, /metrics) take no input.
    for operation in [op for op in operations if op.path.startswith("/v1/")]:

        @hypothesis.given(case=operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        @hypothesis.settings(SETTINGS, max_examples=25)
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=TOKEN, checks=NEGATIVE_CHECKS)

        try:
            fuzz()
        except hypothesis.errors.Unsatisfiable:
            continue  # nothing in it can be invalid (no parameters, no body): /healthz
        fuzzed.append(operation.label)
    assert len(fuzzed) >= 8, fuzzed
    print(f"schemathesis negative: {len(REQUESTS)} requests over {len(fuzzed)} operations")


def test_stateful_links(api_schema: schemathesis.schemas.BaseSchema, settings: Settings) -> None:
    # The artifact routes have no links to follow (they are fuzzed by the two tests above); in
    # the state machine their free-form path parameter made hypothesis report inconsistent data
    # generation and the run take minutes.
    base = api_schema.exclude(tag="artifacts").as_state_machine()

    class Workflow(base):  # type: ignore[misc,valid-type]
        def setup(self) -> None:
            # Each scenario starts from an empty database: hypothesis replays scenarios and
            # needs the same requests to get the same answers.
            with session_scope(settings.database_url) as session:
                session.execute(
                    text("TRUNCATE jobs, devices, fleet_counters, fleet_counter_deltas CASCADE")
                )
            shutil.rmtree(settings.storage_root, ignore_errors=True)  # snapshots: 201, not 200

        def before_call(self, case: schemathesis.Case) -> None:
            # A followed stream of a real job lasts until the job ends (never, here): the
            # streams' follow mode has its own tests (test_api_streams.py).
            if case.query and case.query.get("follow") not in (None, False, "false"):
                case.query["follow"] = False

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, object]:
            return {"headers": TOKEN}

        def validate_response(self, response, case, additional_checks=None, **kwargs):  # type: ignore[no-untyped-def]
            case.validate_response(response, checks=CHECKS)

    # No shrinking: each replay of a scenario against a live database gets fresh ids, so
    # hypothesis cannot shrink one reliably; it would hide the failure behind "inconsistent data
    # generation" after minutes of replays. The failing scenario is reported as found.
    no_shrink = [Phase.explicit, Phase.reuse, Phase.generate]
    Workflow.run(
        settings=hypothesis.settings(
            SETTINGS, max_examples=15, stateful_step_count=6, phases=no_shrink
        )
    )
    print(f"schemathesis stateful: {len(REQUESTS)} requests")
