"""The one exception tree of Ferryman.

Every error Ferryman raises on purpose derives from :class:`FerrymanError`. Foreign errors (sqlite, httpx, QMP,
OSError) are wrapped at the boundary that meets them, ``raise X(...) from err``. Retryability is a property of the type:
callers retry a :class:`TransientError` (after ``delay`` seconds, a bounded number of times) and never a
:class:`PermanentError`. HTTP status codes are not known here; the API layer maps types to codes.

::

    FerrymanError
     ├── PermanentError
     │    ├── InvalidInput          bad size, bad name, malformed request
     │    ├── NotFound              unknown VM, host, site, tenant, token
     │    ├── Conflict              name taken, illegal lifecycle transition
     │    ├── CapacityError         host full, no host can take the VM
     │    ├── Unauthenticated       missing / bad token or certificate
     │    ├── Forbidden             authenticated but not allowed (revoked, wrong identity)
     │    │    └── PolicyRefused     a hard placement rule forbids the creation or migration (reasons in the message)
     │    ├── PKIError              CA, CSR, certificate problems
     │    ├── HypervisorError       QEMU refused or died (permanent for this attempt)
     │    └── StorageError          host storage full or failing (state files, nonce store)
     └── TransientError(delay)
          ├── AgentUnreachable      the host agent did not answer
          └── ScrubIncomplete       an artefact could not be scrubbed and stays in place; a later try may succeed
"""

from __future__ import annotations


class FerrymanError(Exception):
    """Root of every error Ferryman raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PermanentError(FerrymanError):
    """Retrying the same request cannot succeed."""


class TransientError(FerrymanError):
    """The same request may succeed later; ``delay`` is the suggested wait in seconds."""

    def __init__(self, message: str, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class InvalidInput(PermanentError):
    """The request is malformed or a value is out of range."""


class NotFound(PermanentError):
    """The named object does not exist."""


class Conflict(PermanentError):
    """The request contradicts the current state (a name is taken, a transition is illegal)."""


class CapacityError(PermanentError):
    """No room for the request (host full, no eligible host)."""


class Unauthenticated(PermanentError):
    """The caller did not prove who it is."""


class Forbidden(PermanentError):
    """The caller is known but may not do this (revoked certificate, identity mismatch)."""


class PolicyRefused(Forbidden):
    """A hard placement-policy rule forbids the creation or migration; the message lists every reason."""

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = list(reasons or [])


class ApprovalRequired(Forbidden):
    """A dangerous request needs a second, different principal's approval first (two-person rule); the message names
    the approval request just made and how to use it once approved."""


class PKIError(PermanentError):
    """A certificate, key or signing operation failed."""


class StorageError(PermanentError):
    """Host storage is full or failing: a state file could not be written."""


class HypervisorError(PermanentError):
    """QEMU or qemu-img refused an operation or died."""


class NetworkError(PermanentError):
    """A host could not plumb a VM's NIC (namespace, bridge, tap) or install and verify its nftables rules."""


class AgentUnreachable(TransientError):
    """The host agent did not answer."""


class ScrubIncomplete(TransientError):
    """An artefact could not be scrubbed and was left in place (a process still held it, an I/O error): the scrub
    is idempotent and a later try may finish it."""


def error_types() -> dict[str, type[FerrymanError]]:
    """Every class of this tree by name: what an error body's ``kind`` is rebuilt from."""
    found: dict[str, type[FerrymanError]] = {}
    pending: list[type[FerrymanError]] = [FerrymanError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == __name__:
            found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def kind_of(err: FerrymanError) -> type[FerrymanError]:
    """The most specific class of this tree that ``err`` is (a subclass defined elsewhere travels as its base)."""
    for cls in type(err).__mro__:
        if cls.__module__ == __name__ and issubclass(cls, FerrymanError):
            return cls
    return FerrymanError
