"""The typed wire between the controller and its host agents.

Why it exists: the controller's agent client and the agent's HTTPS API must agree on every body they exchange. Each
agent endpoint has a request type and a response type here (frozen pydantic models, unknown fields refused), used by
both ends: the agent's routes declare them as bodies and results, the controller's client sends one and gets the other
back, validated. An error travels as :class:`~ferryman.wire.errors.ErrorBody`, which names its kind in the one
exception tree (:mod:`ferryman.core.errors`) and whether a retry may succeed, and is rebuilt as the same class.

What it must not do: any I/O, or know about HTTP status codes (the API layer maps error types to codes).

::

    wire.base        Message, Reply, Ticketed, Keyed, AgentCall[R] (a request that knows its path and reply type)
    wire.errors      ErrorBody, encode_error, decode_error
    wire.vms         VM lifecycle, inventory, snapshots and stale-copy removal
    wire.migration   one request/response pair per migration step
"""

from ferryman.wire.base import AgentCall, Empty, Keyed, Message, Reply, Ticketed
from ferryman.wire.errors import ErrorBody, decode_error, encode_error

__all__ = ["AgentCall", "Empty", "ErrorBody", "Keyed", "Message", "Reply", "Ticketed", "decode_error", "encode_error"]
