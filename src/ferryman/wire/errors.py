"""Errors on the wire: an agent's error is rebuilt by the controller as the same class, retryability included.

The body names the error's kind (its class in :mod:`ferryman.core.errors`; a subclass defined elsewhere travels as
its nearest class there), the one-line detail, whether a retry may succeed, and for a transient error the suggested
wait. Retryability is a property of the type (STYLE.md habit 3); ``retryable`` is carried too, so that a kind this
end does not know still comes back on the right side of the tree.
"""

from __future__ import annotations

from ferryman.core import errors
from ferryman.wire.base import Reply


class ErrorBody(Reply):
    error: str  # the kind: a class name of ferryman.core.errors
    detail: str
    retryable: bool = False
    retry_after_s: float | None = None


def encode_error(err: errors.FerrymanError) -> ErrorBody:
    retryable = isinstance(err, errors.TransientError)
    return ErrorBody(
        error=errors.kind_of(err).__name__,
        detail=str(err),
        retryable=retryable,
        retry_after_s=err.delay if isinstance(err, errors.TransientError) else None,
    )


def decode_error(body: ErrorBody, *, prefix: str = "") -> errors.FerrymanError:
    """The error ``body`` describes, as the class it names; ``prefix`` (e.g. the host) goes before the detail."""
    detail = f"{prefix}{body.detail}"
    cls = errors.error_types().get(body.error)
    if cls is None or cls is errors.FerrymanError or issubclass(cls, errors.TransientError) != body.retryable:
        cls = errors.TransientError if body.retryable else errors.HypervisorError
    if issubclass(cls, errors.TransientError):
        return cls(detail, delay=body.retry_after_s if body.retry_after_s is not None else 1.0)
    return cls(detail)
