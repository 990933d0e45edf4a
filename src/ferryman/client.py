"""The REST client of the controller's API, for the CLI and the lab, and where it finds the controller (URL, CA,
token).

Lookup order: environment (FERRYMAN_URL, FERRYMAN_CA, FERRYMAN_TOKEN or FERRYMAN_TOKEN_FILE), then a JSON config file
(FERRYMAN_CONFIG, else the local lab's ``cli.json``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from ferryman.pki.tls import client_context


class CliError(Exception):
    """A one-line error for the user; the CLI prints it and exits non-zero."""


def default_lab_dir() -> Path:
    return Path(os.environ.get("FERRYMAN_LAB_DIR") or Path.home() / ".local/share/ferryman/lab")


@dataclass(frozen=True)
class CliConfig:
    url: str
    ca_file: Path
    token: str
    approval: str | None = None  # FERRYMAN_APPROVAL: the approval a dangerous request presents (two-person rule)

    @classmethod
    def load(cls, path: Path | None = None) -> CliConfig:
        """Read the configuration; an explicit ``path`` wins over FERRYMAN_CONFIG and the lab's file."""
        env = os.environ
        path = path or Path(env.get("FERRYMAN_CONFIG") or default_lab_dir() / "cli.json")
        raw: dict[str, Any] = {}
        if path.exists():
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise CliError(f"cannot read {path}: {err}") from err
        url = env.get("FERRYMAN_URL") or raw.get("url")
        ca = env.get("FERRYMAN_CA") or raw.get("ca_file")
        token = env.get("FERRYMAN_TOKEN")
        token_file = env.get("FERRYMAN_TOKEN_FILE") or raw.get("token_file")
        if token is None and token_file:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as err:
                raise CliError(f"cannot read the API token file {token_file}: {err}") from err
        if not (url and ca and token):
            raise CliError(
                f"no controller configured: start the lab (ferryman lab up) or set FERRYMAN_URL, FERRYMAN_CA and "
                f"FERRYMAN_TOKEN (looked for {path})"
            )
        approval = env.get("FERRYMAN_APPROVAL") or None
        return cls(url=url.rstrip("/"), ca_file=Path(ca), token=token, approval=approval)


class Api:
    def __init__(self, config: CliConfig, timeout: float = 300.0) -> None:
        self.config = config
        if not config.ca_file.exists():
            raise CliError(f"controller CA file {config.ca_file} does not exist")
        self._client = httpx.Client(
            base_url=config.url,
            verify=client_context(config.ca_file),
            headers={
                "Authorization": f"Bearer {config.token}",
                **({"X-Ferryman-Approval": config.approval} if config.approval else {}),
            },
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def request(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        """Call the API; the decoded JSON body (``raw``: the text). Errors become one-line CliErrors."""
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise CliError(f"controller unreachable at {self.config.url}: {err}") from err
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text or response.reason_phrase
            raise CliError(str(detail))
        if raw:
            return response.text
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` with ``params`` added to the query it may carry already (``?tenant=`` of a VM's path)."""
        url = httpx.URL(path).copy_merge_params({k: v for k, v in params.items() if v is not None})
        return self.request("GET", str(url))

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def put_file(self, path: str, source: Path, on_bytes: Callable[[int], None] | None = None) -> Any:
        """Stream ``source`` as the body of a PUT (never read whole into memory); ``on_bytes`` hears each chunk."""

        def chunks() -> Iterator[bytes]:
            with source.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                    yield chunk

        try:
            size = source.stat().st_size
        except OSError as err:
            raise CliError(f"cannot read {source}: {err.strerror or err}") from err
        headers = {"content-type": "application/octet-stream", "content-length": str(size)}
        return self.request("PUT", path, content=chunks(), headers=headers)

    def download(self, path: str, dest: Path, on_bytes: Callable[[int], None] | None = None) -> int:
        """Stream the body of ``GET path`` into the new file ``dest`` (0600; never overwrites; made only once the
        controller answered with the body); the bytes written."""

        def new_file() -> IO[bytes]:
            return os.fdopen(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")

        try:
            return self._stream(path, new_file, on_bytes)
        except FileExistsError:
            raise CliError(f"{dest} exists already: export into a new directory") from None
        except OSError as err:
            raise CliError(f"cannot write {dest}: {err.strerror or err}") from err

    def stream_to(self, path: str, out: IO[bytes]) -> int:
        """Stream the body of ``GET path`` into ``out`` (stdout, say) as it arrives, never all of it in memory."""
        return self._stream(path, lambda: contextlib.nullcontext(out), None)

    def _stream(
        self,
        path: str,
        opened: Callable[[], AbstractContextManager[IO[bytes]]],
        on_bytes: Callable[[int], None] | None,
    ) -> int:
        written = 0
        try:
            with self._client.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        detail = response.json().get("detail", response.text)
                    except ValueError:
                        detail = response.text or response.reason_phrase
                    raise CliError(str(detail))
                with opened() as out:
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
                        written += len(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
        except httpx.TransportError as err:
            raise CliError(f"controller unreachable at {self.config.url}: {err}") from err
        return written
