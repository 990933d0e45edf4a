"""The one mapping from Ferryman errors to HTTP status codes, shared by the controller and agent APIs.

Domain errors know nothing of HTTP; this module is the only place that does. Bodies are
:class:`ferryman.wire.errors.ErrorBody` (``{"error": <kind>, "detail": <one line>, "retryable": ...}``) so that
clients can rebuild the same error type.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ferryman.core import errors
from ferryman.wire.errors import ErrorBody, encode_error

STATUS: list[tuple[type[errors.FerrymanError], int]] = [
    (errors.InvalidInput, 400),
    (errors.Unauthenticated, 401),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.CapacityError, 409),
    (errors.PKIError, 400),
    (errors.HypervisorError, 502),
    (errors.StorageError, 507),
    (errors.TransientError, 503),
]


def status_of(err: errors.FerrymanError) -> int:
    for cls, code in STATUS:
        if isinstance(err, cls):
            return code
    return 500


def error_body(kind: str, detail: str) -> dict[str, object]:
    return ErrorBody(error=kind, detail=detail).model_dump()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.FerrymanError)
    async def _ferryman_error(_: Request, err: errors.FerrymanError) -> JSONResponse:
        return JSONResponse(encode_error(err).model_dump(), status_code=status_of(err))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        detail = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return JSONResponse(error_body("InvalidInput", detail), status_code=400)
