"""What comes out of a store is hostile until checked: manifests, object keys, pointers.

Whoever can write a bucket controls every byte a reader gets from it. A name from there
(a manifest entry, an S3 key, a spool record's file name, a pointer's URI) becomes a
local path only through ``local_target``: relative, no ``..``, no empty or ``.`` part, and
resolved inside the target folder. A manifest is accepted only whole: every field of the
expected type, every checksum a 64-hex SHA-256, no path twice. Anything else is one line
naming the artifact, raised before a single byte is written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmpress.components.errors import UserError, short

FORMAT = "llmpress-artifact/1"
DATA = "llmpress-data"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # ~300k files; a bigger "manifest" is an attack on memory
MAX_PATH_CHARS = 1024  # S3's key limit; also well under any filesystem's path limit
SHA256 = re.compile(r"[0-9a-f]{64}")
TREE = re.compile(r"[0-9a-f]{16}")
SESSION = re.compile(r"[0-9a-f]{16,32}")


def relative_path(value: Any, where: str) -> str:
    """``value`` as a safe relative POSIX path (``a/b.json``) or a one-line refusal:
    not absolute, no ``..``/``.``/empty part, no backslash or control character."""
    problem = _path_problem(value)
    if problem:
        raise UserError(f"{where}: unsafe path {short(value)} — {problem}; refusing to read this artifact")
    return str(value)


def _path_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return "a path must be a non-empty string"
    if len(value) > MAX_PATH_CHARS:
        return f"longer than {MAX_PATH_CHARS} characters"
    if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        return "absolute paths are not allowed"
    if "\\" in value or any(ord(c) < 32 or c == "\x7f" for c in value):
        return "backslashes and control characters are not allowed"
    if any(part in ("", ".", "..") for part in value.split("/")):
        return "'..', '.' and empty path parts are not allowed"
    return None


def local_target(root: Path, relative: str, where: str) -> Path:
    """``root / relative`` after checking ``relative`` and that the result, symlinks
    resolved, stays inside ``root`` (a folder already there may be a link elsewhere)."""
    relative_path(relative, where)
    target = root / relative
    if not target.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{where}: unsafe path {short(relative)} — it resolves outside {root}; refusing to write there")
    return target


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A manifest's bytes as a checked manifest, or one line saying what is wrong."""
    import json

    def refuse(problem: str) -> UserError:
        return UserError(f"{where}: not a valid llmpress manifest — {problem}; remove it or re-upload the artifact")

    if len(raw) > MAX_MANIFEST_BYTES:
        raise refuse(f"{len(raw)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):
        raise refuse("not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise refuse(f"format must be {FORMAT!r}")
    if not isinstance(manifest.get("tree"), str) or not TREE.fullmatch(manifest["tree"]):
        raise refuse(f"tree {short(manifest.get('tree'))} is not 16 hex digits")
    data = manifest.get("data")
    if not isinstance(data, str) or not re.fullmatch(rf"{DATA}/{SESSION.pattern}/", data):
        raise refuse(f"data {short(data)} is not {DATA}/<upload session>/")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise refuse("files must be a list")
    seen: set[str] = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or set(entry) != {"path", "size", "sha256"}:
            raise refuse(f"files[{i}] must have exactly path, size and sha256")
        problem = _path_problem(entry["path"])
        if problem:
            raise refuse(f"files[{i}].path {short(entry['path'])}: {problem}")
        size, digest = entry["size"], entry["sha256"]
        if type(size) is not int or size < 0:
            raise refuse(f"files[{i}].size {short(size)} is not a byte count")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise refuse(f"files[{i}].sha256 {short(digest)} is not a SHA-256 (64 lowercase hex digits); verification cannot be switched off")
        if entry["path"] in seen:
            raise refuse(f"files[{i}].path {short(entry['path'])} is listed twice")
        seen.add(entry["path"])
    _no_file_is_a_folder(seen, refuse)
    return manifest


def _no_file_is_a_folder(paths: set[str], refuse: Any) -> None:
    """``a`` and ``a/b`` cannot both be files."""
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in paths:
                raise refuse(f"{short(path)} lies under {short('/'.join(parts[:depth]))}, which is a file")


def plain_files(listing: list[tuple[str, int, str]], where: str, skip: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """The files of a prefix without a manifest, from its listing (key, size, version):
    folder markers (``sub/``, empty) are dropped, every other key must be a safe
    relative path."""
    files = []
    for key, size, version in listing:
        if key.startswith(skip):
            continue
        if key.endswith("/") and size == 0:
            continue  # a "folder" some consoles create
        files.append((relative_path(key, f"{where}{key}"), size, version))
    _no_file_is_a_folder({f[0] for f in files}, lambda problem: UserError(f"{where}: {problem}; refusing to read this prefix"))
    return files
