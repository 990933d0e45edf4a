"""Images on the wire: whether a host holds an image file, and the upload of one into its cache.

The upload itself is not JSON: the controller streams the file's bytes as the body of ``PUT /v1/images/{digest}``
(:data:`UPLOAD_PATH`), and the agent keeps them only if they hash to that digest; the answer is an
:class:`ImageHeld`.
"""

from __future__ import annotations

from typing import ClassVar

from ferryman.wire.base import AgentCall, Reply

UPLOAD_PATH = "/v1/images/{target}"


class ImageHeld(Reply):
    digest: str
    present: bool
    size: int = 0


class HoldsImage(AgentCall[ImageHeld]):
    """Does this host's image cache hold the file ``{target}`` (a ``sha256:`` digest)?"""

    method: ClassVar[str] = "GET"
    path: ClassVar[str] = "/v1/images/{target}"
