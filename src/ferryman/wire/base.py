"""The building blocks of every controller ↔ agent message.

A :class:`Message` is a frozen pydantic model that refuses unknown fields: a request that does not match the agent's
version fails loudly at the boundary instead of being half understood. A :class:`Reply` (an agent's answer) ignores
fields it does not know, so an agent may add a fact before the controller reads it. An :class:`AgentCall` is a
request that knows where it goes (method and path on the agent) and what comes back, so the controller's client has
one typed method, ``call(host, target, request) -> reply``, for every endpoint.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, ClassVar, Generic, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

MIN_KEY_BYTES = 16


class Message(BaseModel):
    """A body on the controller ↔ agent wire. A validation error never repeats the value it refused (it may be a
    key or a credential)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class Reply(Message):
    """An agent's answer. It ignores fields this end does not know: an agent may report a new fact before its
    controller reads it (a request, by contrast, refuses them)."""

    model_config = ConfigDict(frozen=True, extra="ignore", hide_input_in_errors=True)


class Empty(Reply):
    """A response with nothing to say."""


R = TypeVar("R", bound=Reply)


class AgentCall(Message, Generic[R]):
    """A request to one agent endpoint. ``path`` is a template with ``{target}``, the object the call is about (a
    migration id, a VM id); :meth:`response_type` is the model the agent answers with."""

    method: ClassVar[str] = "POST"
    path: ClassVar[str]

    def url_path(self, target: str) -> str:
        return self.path.format(target=target)

    def body(self) -> dict[str, Any] | None:
        """The JSON body to send (None for a GET or DELETE)."""
        return self.model_dump(mode="json") if self.method == "POST" else None

    @classmethod
    def response_type(cls) -> type[R]:
        for klass in cls.__mro__:
            meta = getattr(klass, "__pydantic_generic_metadata__", None)
            if meta and meta.get("origin") is AgentCall and meta.get("args"):
                return cast(type[R], meta["args"][0])
        raise TypeError(f"{cls.__name__} does not name its response type")


class Keyed(Message):
    """A request that may carry the disk key of the VM copy it opens (base64 on the wire, bytes in memory)."""

    disk_key: bytes | None = Field(default=None, repr=False)  # never in a repr, so never in a log line

    @field_validator("disk_key", mode="before")
    @classmethod
    def _decode_key(cls, value: Any) -> bytes | None:
        if value is None or isinstance(value, bytes):
            key = value
        else:
            try:
                key = base64.b64decode(str(value), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("disk_key must be base64") from None
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise ValueError("disk_key is too short")
        return key

    @field_serializer("disk_key")
    def _encode_key(self, key: bytes | None) -> str | None:
        return None if key is None else base64.b64encode(key).decode()


class Ticketed(Message):
    """A migration step: it carries the controller-signed migration ticket. A missing one reads as empty, which the
    agent refuses as Forbidden like any other ticket that does not verify."""

    ticket: str = Field(default="", repr=False)
