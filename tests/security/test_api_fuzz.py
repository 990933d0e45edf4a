"""API fuzzing: every operation of the controller's OpenAPI schema, with generated paths, queries and bodies, called
with each role's token. Whatever comes in, the answer is a typed error or a success: never a 500, never a traceback
or an internal error text, and never a 5xx other than the transient kinds a controller without agents must give
(an agent unreachable). The two routes that would lock the fuzzing principals out (rotating a token, disabling a
principal) are exercised by the access matrix instead."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from ferryman.controller.access import RULES

from .conftest import ROLES, World, open_world

EXAMPLES = 6
TRANSIENT = {"AgentUnreachable", "TransientError", "HypervisorError", "StorageError"}
LOCKOUTS = {("POST", "/api/v1/principals/{name}/tokens"), ("POST", "/api/v1/principals/{name}/disable")}


@pytest.fixture(scope="module")
def shared(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    opened = open_world(template, tmp_path_factory.mktemp("fuzz") / "controller")
    yield opened
    opened.fleet.repo.close()


def _check(case: Any, world: World) -> None:
    for role in ROLES:
        response = case.call(headers=world.headers(role))
        text = response.text
        where = (role, case.method, case.formatted_path, text[:300])
        assert "Traceback" not in text and 'File "' not in text, where
        assert response.status_code != 500, where
        if response.status_code >= 500:
            assert response.json().get("error") in TRANSIENT, where


def test_no_request_of_any_role_gets_a_server_error(shared: World) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", shared.client.app).include(path_regex="^/api/v1/")
    operations = [result.ok() for result in schema.get_all_operations()]
    # every route of the API (and the enrolment, which a host's one-time token authorises)
    assert {(o.method.upper(), o.path) for o in operations} == {*RULES, ("POST", "/api/v1/enrol")}
    for operation in operations:
        if (operation.method.upper(), operation.path) in LOCKOUTS:
            continue

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            _check(case, shared)

        fuzz()
