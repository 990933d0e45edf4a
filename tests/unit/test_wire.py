"""The controller ↔ agent wire: typed bodies both ends share, errors that keep their class and retryability."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi.routing import APIRoute
from pydantic import ValidationError

from ferryman.agent.app import create_agent_app
from ferryman.agent.migration import MigrationAgent
from ferryman.agent.settings import AgentSettings
from ferryman.agent.storage.image_cache import ImageCache
from ferryman.core import errors
from ferryman.core.clock import SystemClock
from ferryman.core.models import DiskSpec, ImageRef, RunState, VMRuntime, VMSpec
from ferryman.pki.ca import CertificateAuthority
from ferryman.wire import images as wi
from ferryman.wire import migration as wm
from ferryman.wire import vms as wv
from ferryman.wire.base import AgentCall, Reply
from ferryman.wire.errors import ErrorBody, decode_error, encode_error


def roundtrip(err: errors.FerrymanError) -> errors.FerrymanError:
    body = ErrorBody.model_validate(json.loads(json.dumps(encode_error(err).model_dump())))
    return decode_error(body, prefix="host-b: ")


ERROR_CLASSES = sorted(errors.error_types().values(), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=[c.__name__ for c in ERROR_CLASSES])
def test_every_error_class_comes_back_as_itself(cls: type[errors.FerrymanError]) -> None:
    """Each class of the tree survives the wire with its kind, its retryability and its detail."""
    back = roundtrip(cls("it broke"))
    expected = cls if cls is not errors.FerrymanError else errors.HypervisorError
    assert type(back) is expected and str(back) == "host-b: it broke"
    assert isinstance(back, errors.TransientError) == issubclass(cls, errors.TransientError)


def test_a_transient_error_keeps_its_suggested_delay() -> None:
    """A transient error's wait travels with it."""
    back = roundtrip(errors.ScrubIncomplete("disk busy", delay=7.5))
    assert isinstance(back, errors.ScrubIncomplete) and back.delay == 7.5


def test_an_error_class_defined_elsewhere_travels_as_its_nearest_base() -> None:
    """A subclass outside the tree (an agent's own error) is rebuilt as the tree's class it derives from."""

    class DiskVanished(errors.StorageError):
        pass

    assert type(roundtrip(DiskVanished("gone"))) is errors.StorageError


@pytest.mark.parametrize(("retryable", "expected"), [(True, errors.TransientError), (False, errors.HypervisorError)])
def test_an_unknown_kind_still_lands_on_the_right_side_of_the_tree(
    retryable: bool, expected: type[errors.FerrymanError]
) -> None:
    """A kind this end does not know (a newer agent) keeps its retryability."""
    back = decode_error(ErrorBody(error="QuantumFlux", detail="?", retryable=retryable))
    assert type(back) is expected


def test_a_kind_that_contradicts_its_retryability_is_not_trusted() -> None:
    """A body naming a permanent kind but claiming to be retryable is read by its retryability."""
    back = decode_error(ErrorBody(error="Conflict", detail="?", retryable=True))
    assert type(back) is errors.TransientError


def test_disk_keys_are_base64_on_the_wire_bytes_in_memory_and_never_in_a_repr() -> None:
    """A disk key crosses as base64, is checked for length, and no repr or str of a request shows it."""
    key = bytes(range(32))
    request = wm.Activate(ticket="t", lease="l", disk_key=key)
    body = request.body()
    assert body is not None and body["disk_key"] == base64.b64encode(key).decode()
    assert wm.Activate.model_validate(body).disk_key == key
    assert key.hex() not in repr(request) and "disk_key" not in repr(request) and str(key) not in str(request)
    assert wm.Activate.model_validate({"ticket": "t", "lease": "l"}).disk_key is None
    for bad in ("not base64!", base64.b64encode(b"short").decode(), 42):
        with pytest.raises(ValidationError, match=r"base64|too short"):
            wm.Activate.model_validate({**body, "disk_key": bad})
    with pytest.raises(ValidationError) as caught:  # an error never repeats the value it refused
        wm.Activate(ticket="t", lease="l", disk_key=b"short-secret")
    assert "short-secret" not in str(caught.value)


def test_a_request_refuses_unknown_fields_and_a_reply_ignores_them() -> None:
    """A request with a field this agent does not know fails at the boundary; an answer with a fact the controller
    does not know yet still reads."""
    assert wm.Closed.model_validate({"closed": True, "receipts": [], "new_fact": 1}) == wm.Closed(closed=True)
    with pytest.raises(ValidationError):
        wm.Scrub.model_validate({"ticket": "t", "side": "source", "mode": "zero", "force": True})
    with pytest.raises(ValidationError):
        wm.Scrub.model_validate({"ticket": "t", "side": "sideways"})


def test_specs_and_runtimes_convert_both_ways() -> None:
    """The VM spec and runtime travel as the domain dataclasses; an unknown run state reads as other."""
    spec = VMSpec("vm-1", "web-1", 1, 128, (DiskSpec(1 << 26),), "canary", generation=3, encrypted=True)
    assert wv.spec_from_dict(json.loads(json.dumps(wv.spec_to_dict(spec)))) == spec
    image = ImageRef(
        "debian-12",
        "sha256:" + "a" * 64,
        1 << 20,
        "qcow2",
        "c2ln",
        "PEM",
        boot="kernel",
        kernel="sha256:" + "b" * 64,
        kernel_size=10,
        initrd="sha256:" + "c" * 64,
        initrd_size=20,
    )
    booted = dataclasses.replace(spec, image=image)
    assert wv.spec_from_dict(json.loads(json.dumps(wv.spec_to_dict(booted)))) == booted
    with pytest.raises(errors.InvalidInput, match="malformed VM spec"):
        wv.spec_from_dict({"vm_id": "x"})
    runtime = VMRuntime("vm-1", "web-1", RunState.PAUSED, 42, 3)
    assert wv.runtime_from_dict(wv.runtime_to_dict(runtime)) == runtime
    assert wv.runtime_from_dict({**wv.runtime_to_dict(runtime), "run_state": "suspended"}).run_state is RunState.OTHER


def agent_calls() -> list[type[AgentCall[Any]]]:
    found: list[type[AgentCall[Any]]] = []
    for module in (wm, wv, wi):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, AgentCall) and "path" in vars(value):
                found.append(value)
    return found


def test_every_request_names_its_response_type() -> None:
    """Each agent request knows the model the agent answers with."""
    calls = agent_calls()
    assert len(calls) >= 20
    for call in calls:
        assert issubclass(call.response_type(), Reply), call


def test_the_agent_app_serves_every_wire_request_with_its_types(tmp_path: Path) -> None:
    """Every request of the wire is a route of the agent app taking that body and answering its response type."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", SystemClock())
    settings = AgentSettings(
        name="host-a",
        state_dir=tmp_path / "state",
        listen_host="127.0.0.2",
        listen_port=8444,
        controller_url="https://127.0.0.1:8443",
        controller_ca=tmp_path / "ca" / "ca.pem",
    )
    settings.pki_dir.mkdir(parents=True)
    settings.ca.write_bytes(ca.cert_pem)
    app = create_agent_app(settings, cast(Any, object()), cast(MigrationAgent, object()), cast(ImageCache, object()))
    routes = {
        (method, re.sub(r"\{(mid|vm_id|digest)\}", "{target}", route.path)): route
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }
    for call in agent_calls():
        route = routes.get((call.method, call.path))
        assert route is not None, f"no agent route for {call.__name__} {call.method} {call.path}"
        assert route.response_model is call.response_type(), call.__name__
        if call.method == "POST":
            assert route.body_field is not None and route.body_field.field_info.annotation is call, call.__name__
