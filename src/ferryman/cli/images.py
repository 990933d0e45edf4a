"""``ferryman image …``: the image registry (import, list, show, verify, revoke), its trusted signing keys
(``image trust …``), and the publisher's side, offline (``image keygen``, ``image sign``).

An import hashes each file here first, uploads only the files the controller does not hold yet (streamed, with
progress on stderr), then asks the controller to register the image; the controller checks every digest on arrival
and the signature against its trusted keys, so nothing the CLI computed is taken on trust.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ferryman.cli.context import Json, segment
from ferryman.cli.context import api as _api
from ferryman.cli.output import emit_json, fields, short_time, table
from ferryman.client import Api, CliError
from ferryman.core.errors import InvalidInput
from ferryman.core.units import format_bytes
from ferryman.images.signing import Artefact, new_private_key, parse_signature, sign

image_app = typer.Typer(no_args_is_help=True, help="VM images: signed, content-addressed, revocable.")
trust_app = typer.Typer(no_args_is_help=True, help="The publishers' keys trusted to sign images.")
image_app.add_typer(trust_app, name="trust")

File = Annotated[Path, typer.Argument(exists=False, dir_okay=False, help="a file")]
Kernel = Annotated[Path | None, typer.Option("--kernel", help="direct-kernel image: the kernel")]
Initrd = Annotated[Path | None, typer.Option("--initrd", help="direct-kernel image: the initrd")]


class _Progress:
    """Percent done of one file on stderr: rewritten in place on a terminal, every 25 % otherwise."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done, self._shown = what, max(total, 1), 0, -1
        self._tty = sys.stderr.isatty()

    def __call__(self, count: int) -> None:
        self.done += count
        percent = min(100, self.done * 100 // self.total)
        step = percent if self._tty else percent // 25 * 25
        if step != self._shown:
            self._shown = step
            end = "\r" if self._tty and percent < 100 else "\n"
            print(f"  {self.what}: {percent:3d}% of {format_bytes(self.total)}", end=end, file=sys.stderr, flush=True)


def _hash(path: Path, role: str) -> Artefact:
    try:
        size = path.stat().st_size
        progress = _Progress(f"hashing {role} {path.name}", size)
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                progress(len(chunk))
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror or err}") from None
    return Artefact(role, "sha256:" + h.hexdigest(), size)


def _artefacts(disk: Path, kernel: Path | None, initrd: Path | None) -> list[tuple[Path, Artefact]]:
    if (kernel is None) != (initrd is None):
        raise CliError("a direct-kernel image needs both --kernel and --initrd")
    files = [(disk, "disk")] + ([(kernel, "kernel"), (initrd, "initrd")] if kernel and initrd else [])
    return [(path, _hash(path, role)) for path, role in files]


def _upload(api: Api, path: Path, artefact: Artefact) -> None:
    try:
        api.get(f"/api/v1/blobs/{artefact.digest}")
        print(f"  {artefact.role} {artefact.digest[:19]}… is on the controller already", file=sys.stderr)
        return
    except CliError:
        pass
    api.put_file(f"/api/v1/blobs/{artefact.digest}", path, _Progress(f"uploading {artefact.role}", artefact.size))


def _read_signature(path: Path) -> str:
    try:
        raw = parse_signature(path.read_bytes())
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror or err}") from None
    except InvalidInput as err:
        raise CliError(f"{path}: {err}") from None
    return base64.b64encode(raw).decode()


@image_app.command("import")
def image_import(
    name: Annotated[str, typer.Argument(help="the image's name, e.g. debian-12")],
    disk: File,
    os_name: Annotated[str, typer.Option("--os", help="the guest OS, e.g. debian")],
    version: Annotated[str, typer.Option("--version", help="its version (the baseline), e.g. 12.8")],
    signature: Annotated[Path, typer.Option("--signature", help="the publisher's signature file")],
    key: Annotated[str | None, typer.Option("--key", help="the trusted key that must have signed it")] = None,
    kernel: Kernel = None,
    initrd: Initrd = None,
    cmdline: Annotated[str | None, typer.Option("--cmdline", help="direct-kernel image: command line")] = None,
    firmware: Annotated[str, typer.Option("--firmware", help="bios (SeaBIOS) or uefi (OVMF)")] = "bios",
    guest_agent: Annotated[bool, typer.Option("--guest-agent", help="the image runs qemu-guest-agent")] = False,
    json_: Json = False,
) -> None:
    """Import a signed image: hash, upload what is missing, register (the controller checks the signature)."""
    signed = _read_signature(signature)
    files = _artefacts(disk, kernel, initrd)
    api = _api()
    for path, artefact in files:
        _upload(api, path, artefact)
    digests = {a.role: a.digest for _, a in files}
    body: dict[str, Any] = {
        "name": name,
        "disk": digests["disk"],
        "os": os_name,
        "version": version,
        "signature": signed,
        "key": key,
        "kernel": digests.get("kernel"),
        "initrd": digests.get("initrd"),
        "cmdline": cmdline,
        "firmware": firmware,
        "guest_agent": guest_agent,
    }
    image = api.post("/api/v1/images", body)
    if json_:
        emit_json(image)
        return
    print(f"imported {image['name']}: {image['baseline']}, {image['digest']}, signed by {image['publisher']}")


def _image_rows(images: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            i["name"],
            i["baseline"],
            i["digest"][:19] + "…",
            format_bytes(i["size"]),
            i["format"],
            i["publisher"],
            i["signature"],
            i["status"],
            i.get("vms", 0),
        ]
        for i in images
    ]


@image_app.command("list")
def image_list(json_: Json = False) -> None:
    """Every image with its baseline, digest, publisher, signature status and the number of VMs from it."""
    images = _api().get("/api/v1/images")
    if json_:
        emit_json(images)
        return
    columns = ["name", "baseline", "digest", "size", "format", "publisher", "signature", "status", "vms"]
    table(None, columns, _image_rows(images))


@image_app.command("show")
def image_show(
    name: str,
    verify: Annotated[bool, typer.Option("--verify", help="also re-hash the stored files now")] = False,
    json_: Json = False,
) -> None:
    """One image: digests, size, format, publisher and key fingerprint, signature status, baseline, VMs."""
    api = _api()
    image = api.get(f"/api/v1/images/{segment(name)}")
    if verify:
        image["verification"] = api.post(f"/api/v1/images/{segment(name)}/verify")
    if json_:
        emit_json(image)
        return
    pairs: list[tuple[str, Any]] = [
        ("name", image["name"]),
        ("status", image["status"] + (f" ({image['revoked_reason']})" if image["revoked_reason"] else "")),
        ("baseline", image["baseline"]),
        ("digest", image["digest"]),
        ("size", f"{format_bytes(image['size'])} ({image['format']}, virtual {format_bytes(image['virtual_size'])})"),
        ("publisher", f"{image['publisher']} ({image['fingerprint']})"),
        ("signature", image["signature"]),
        ("boot", f"{image['boot']} via {image['firmware']}" + (" + guest agent" if image["guest_agent"] else "")),
    ]
    if image["kernel"]:
        pairs += [("kernel", image["kernel"]), ("initrd", image["initrd"]), ("cmdline", image["cmdline"])]
    pairs += [
        ("imported", f"{short_time(image['imported_at'])} by {image['imported_by']}"),
        ("VMs", ", ".join(image["vm_names"]) or "-"),
    ]
    if image["revoked_at"]:
        pairs.append(("revoked", f"{short_time(image['revoked_at'])} by {image['revoked_by']}"))
    if verify:
        check = image["verification"]
        pairs.append(("verified now", "ok" if check["ok"] else f"FAILED: {check['detail']}"))
    fields(pairs)
    if verify and not image["verification"]["ok"]:
        raise typer.Exit(1)


@image_app.command("verify")
def image_verify(name: str, json_: Json = False) -> None:
    """Re-hash the image's stored files and check its signature and trust now (exit 1 if it may not be used)."""
    check = _api().post(f"/api/v1/images/{segment(name)}/verify")
    if json_:
        emit_json(check)
    else:
        print(f"{name}: {'ok' if check['ok'] else 'FAILED'}: {check['detail']}")
    if not check["ok"]:
        raise typer.Exit(1)


@image_app.command("revoke")
def image_revoke(
    name: str, reason: Annotated[str, typer.Option("--reason", help="why, e.g. a CVE")], json_: Json = False
) -> None:
    """Revoke an image: no new VM, boot or migration from it; VMs running from it show up in compliance."""
    image = _api().post(f"/api/v1/images/{segment(name)}/revoke", {"reason": reason})
    if json_:
        emit_json(image)
        return
    print(f"revoked {name}: {image['revoked_reason']}")


@image_app.command("push")
def image_push(
    name: str,
    host: Annotated[list[str] | None, typer.Option("--host", help="a host (repeatable; default: all)")] = None,
    json_: Json = False,
) -> None:
    """Verify the image and send it to hosts ahead of use; each host checks every file on arrival."""
    out = _api().post(f"/api/v1/images/{segment(name)}/push", {"hosts": host or []})
    if json_:
        emit_json(out)
        return
    for target, sent in sorted(out["sent_bytes"].items()):
        print(f"{target}: " + (f"sent {format_bytes(sent)}" if sent else "holds it already"))


@image_app.command("keygen")
def image_keygen(
    name: Annotated[str, typer.Argument(help="the publisher key's name: writes NAME.key and NAME.pub")],
    directory: Annotated[Path, typer.Option("--dir", help="where to write them")] = Path("."),
) -> None:
    """A new Ed25519 publisher key pair (offline; the private key is written owner-only)."""
    private, public = new_private_key()
    key_file, pub_file = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (key_file, pub_file):
        if path.exists():
            raise CliError(f"{path} exists already: not overwritten")
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private)
        pub_file.write_text(public)
    except OSError as err:
        raise CliError(f"cannot write the key pair: {err.strerror or err}") from None
    print(f"wrote {key_file} (private, keep it offline) and {pub_file} (for 'ferryman image trust add')")


@image_app.command("sign")
def image_sign(
    disk: File,
    key: Annotated[Path, typer.Option("--key", help="the publisher's private key (PEM)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the signature file to write")],
    kernel: Kernel = None,
    initrd: Initrd = None,
) -> None:
    """Sign an image's files as its publisher (offline): writes the base64 signature for 'image import'."""
    try:
        private = key.read_bytes()
    except OSError as err:
        raise CliError(f"cannot read {key}: {err.strerror or err}") from None
    artefacts = [a for _, a in _artefacts(disk, kernel, initrd)]
    try:
        signature = sign(private, artefacts)
    except InvalidInput as err:
        raise CliError(f"{key}: {err}") from None
    try:
        out.write_text(base64.b64encode(signature).decode() + "\n")
    except OSError as err:
        raise CliError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"signed {', '.join(a.role for a in artefacts)} of {disk.name}: {out}")


@trust_app.command("add")
def trust_add(
    name: str,
    public_key: Annotated[Path, typer.Argument(help="the publisher's public key (PEM or base64)")],
    json_: Json = False,
) -> None:
    """Trust a publisher's Ed25519 key to sign images (audited, with who added it)."""
    try:
        text = public_key.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"cannot read {public_key}: {err}") from None
    key = _api().post("/api/v1/image-keys", {"name": name, "public_key": text})
    if json_:
        emit_json(key)
        return
    print(f"trusted {key['name']}: {key['fingerprint']}")


@trust_app.command("list")
def trust_list(
    all_: Annotated[bool, typer.Option("--all", help="include removed keys")] = False, json_: Json = False
) -> None:
    """The trusted publisher keys, with who added them and when."""
    keys = _api().get("/api/v1/image-keys", all=all_ or None)
    if json_:
        emit_json(keys)
        return
    rows = [
        [k["name"], k["fingerprint"], "yes" if k["trusted"] else "removed", short_time(k["added_at"]), k["added_by"]]
        for k in keys
    ]
    table(None, ["name", "fingerprint", "trusted", "added", "by"], rows)


@trust_app.command("remove")
def trust_remove(name: str) -> None:
    """Stop trusting a key: the images it signed no longer boot or migrate."""
    key = _api().delete(f"/api/v1/image-keys/{segment(name)}")
    print(f"removed {key['name']} ({key['fingerprint']}) from the trusted keys")
