"""The artifact store: one small interface for every place a model or dataset lives.

``put_dir(local_dir, uri)``, ``get_dir(uri, local_dir)``, ``exists(uri)`` and
``get_file(uri, path)`` work the same on a local folder and on ``s3://bucket/prefix``
(any S3-compatible endpoint; see ``s3.py``). An artifact at ``uri`` is laid out as::

    <uri>/llmpress-data/<upload>/<relative path of each file>
    <uri>/llmpress-manifest.json      {"tree", "data", "files": [{"path", "size", "sha256"}]}
    <uri>/llmpress-pending/<upload>.json   while an upload runs: {"session", "files", "owner", "heartbeat"}

The data prefix is the prefix of one writer's upload session: it becomes the artifact
only when the manifest that names it is written, last, in one atomic conditional
PUT/rename. ``tree`` (a hash of paths, sizes and SHA-256s) names the content. Readers
trust nothing without a manifest and verify every checksum, so a partial upload is
never read as a model. Each file is read once while uploading (hashed as its parts go
up); a rerun after a failed upload takes its session over and skips files already
there and reuses finished multipart parts. Any number of writers may race on one URI
(``sessions.py`` says how); names and checksums read back are checked
(``validation.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmpress.components.artifacts import sessions
from llmpress.components.artifacts.sessions import PENDING
from llmpress.components.artifacts.validation import DATA, FORMAT, MAX_MANIFEST_BYTES, local_target, parse_manifest, plain_files
from llmpress.components.errors import UserError

log = logging.getLogger("llmpress.artifacts")

MANIFEST = "llmpress-manifest.json"
MB = 1024 * 1024
HASH_CHUNK = 8 * MB


@dataclass
class Tuning:
    """How bytes move. Defaults come from the environment so that a cluster can tune
    them per node pool without touching recipes."""

    concurrency: int = field(default_factory=lambda: int(os.environ.get("LLMPRESS_S3_CONCURRENCY", "8")))
    part_size: int = field(default_factory=lambda: int(float(os.environ.get("LLMPRESS_S3_PART_MB", "64")) * MB))
    retry_seconds: float = field(default_factory=lambda: float(os.environ.get("LLMPRESS_S3_RETRY_SECONDS", "300")))
    progress: Callable[[int], None] | None = None  # called with each chunk of bytes moved


@dataclass
class Stats:
    """What a transfer did: the figures a benchmark or a resume check reads."""

    files: int = 0
    bytes: int = 0
    skipped_files: int = 0
    skipped_bytes: int = 0
    reused_parts: int = 0
    seconds: float = 0.0
    tree: str = ""  # the committed content's id (manifest ``tree``; for a plain prefix, a hash of its listing)


class Store(Protocol):
    """What each backend (local folder, S3) provides; keys are relative to the artifact URI."""

    tuning: Tuning

    def describe(self, key: str) -> str: ...
    def read_bytes(self, key: str) -> bytes | None: ...
    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]: ...  # (bytes, version tag)
    def write_bytes(self, key: str, data: bytes) -> None: ...
    @property
    def conditional(self) -> bool: ...  # whether write_if is honoured
    def write_if(self, key: str, data: bytes, tag: str | None) -> bool: ...  # False: the version changed (None: must be absent)
    def size(self, key: str) -> int | None: ...
    def upload(self, path: Path, key: str, size: int, stats: Stats) -> tuple[str, bool]: ...  # (SHA-256, already there)
    def abort_uploads(self, prefix: str) -> None: ...
    def download(self, key: str, path: Path, size: int, tag: str | None = None) -> None: ...  # tag: refuse another version
    def list(self, prefix: str) -> list[tuple[str, int]]: ...
    def list_versions(self, prefix: str) -> list[tuple[str, int, str]]: ...  # (key, size, version tag)
    def delete(self, keys: list[str]) -> None: ...
    def close(self) -> None: ...


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def open_store(uri: str, tuning: Tuning | None = None) -> Store:
    """The backend for ``uri``: S3 for ``s3://``, a local folder otherwise."""
    tuning = tuning or Tuning()
    if is_s3(uri):
        from llmpress.components.artifacts.s3 import S3Store

        return S3Store(uri, tuning)
    from llmpress.components.artifacts.local import LocalStore

    return LocalStore(uri, tuning)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in chunks (never whole into memory)."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])  # hashlib drops the GIL on large buffers: files hash in parallel
    return digest.hexdigest()


def _scan(local_dir: Path, concurrency: int) -> list[dict[str, Any]]:
    if not local_dir.is_dir():
        raise UserError.field("artifact", str(local_dir), "no such local directory to upload")
    paths = sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.name.endswith(".part"))
    with ThreadPoolExecutor(concurrency) as pool:
        digests = list(pool.map(sha256_file, paths))
    return [{"path": p.relative_to(local_dir).as_posix(), "size": p.stat().st_size, "sha256": d} for p, d in zip(paths, digests, strict=True)]


def tree_id(files: list[dict[str, Any]]) -> str:
    """The version's name: a hash of paths, sizes and checksums (same content, same keys)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(store: Store) -> dict[str, Any] | None:
    """The committed manifest, checked whole (validation.parse_manifest), or None."""
    return _read_manifest_tagged(store)[0]


def _read_manifest_tagged(store: Store) -> tuple[dict[str, Any] | None, str | None]:
    """The committed manifest and its version tag (what a conditional commit names)."""
    size, where = store.size(MANIFEST), store.describe(MANIFEST)
    if size is not None and size > MAX_MANIFEST_BYTES:  # refused before it is read: a huge object must not fill memory
        raise UserError(f"{where}: not a valid llmpress manifest — {size} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    raw, tag = store.read_tagged(MANIFEST)  # a GET even when HEAD found nothing: it names a missing bucket (NoSuchBucket)
    if raw is None:
        return None, None
    manifest = parse_manifest(raw, where)
    if tree_id(manifest["files"]) != manifest["tree"]:
        raise UserError(f"{where}: not a valid llmpress manifest — its tree {manifest['tree']} is not the hash of the files it lists; re-upload the artifact")
    return manifest, tag


def committed(uri: str, tuning: Tuning | None = None) -> dict[str, Any] | None:
    """The manifest of the artifact committed at ``uri``, or None."""
    store = open_store(uri, tuning)
    try:
        return read_manifest(store)
    finally:
        store.close()


def exists(uri: str, tuning: Tuning | None = None) -> bool:
    """True when a committed artifact (one with a manifest) is at ``uri``."""
    store = open_store(uri, tuning)
    try:
        return store.read_bytes(MANIFEST) is not None
    finally:
        store.close()


def put_dir(local_dir: str | Path, uri: str, tuning: Tuning | None = None) -> Stats:
    """Upload a directory as one artifact; visible only once complete (manifest last).

    Each file is read once: its SHA-256 is computed while its parts go up. Rerunning
    after an interruption uploads only what is missing; rerunning with the same content
    when the artifact is already committed moves nothing."""
    tuning = tuning or Tuning()
    start = time.monotonic()
    local_dir = Path(local_dir)
    files = _list(local_dir)
    stats = Stats(files=len(files))
    store = open_store(uri, tuning)
    try:
        current, current_tag = _read_manifest_tagged(store)
        if current and _shape(current["files"]) == _shape(files):
            # maybe the same content again (a rerun): hashing (one read, no upload) tells
            hashed = _scan(local_dir, tuning.concurrency)
            if current.get("tree") == tree_id(hashed):
                stats.tree, stats.skipped_files, stats.skipped_bytes = current["tree"], len(files), sum(f["size"] for f in files)
                log.info("artifact %s already holds this content (%d files); nothing to upload", uri, len(files))
                return stats
        session = sessions.Session(store, _shape(files), current)  # this writer's own prefix, never a committed one
        try:
            _upload(store, local_dir, files, session, stats, uri)
            session.check()  # still ours: a writer that stalled past its lease commits nothing
        except BaseException:
            session.release()
            raise
        session.stop()
        stats.tree = tree_id(files)
        manifest = {"format": FORMAT, "tree": stats.tree, "data": session.base, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
        replaced = sessions.commit(store, MANIFEST, manifest, (current, current_tag), lambda: _read_manifest_tagged(store))
        if not store.conditional and read_manifest(store) != manifest:
            log.warning("another writer committed %s right after this upload; its version stands (this server ignores conditional writes)", uri)
        try:
            sessions.collect(store, session.id, replaced, lambda: read_manifest(store))
        except UserError as err:  # committed whole: leftovers only cost space, and the next writer collects them
            log.warning("committed %s, but cleaning up after it failed (%s); the next upload collects the rest", uri, err)
    finally:
        store.close()
    stats.seconds = time.monotonic() - start
    log.info("uploaded %s: %.1f MB in %.1fs (%.0f MB/s), %d files skipped as already there",
             uri, stats.bytes / MB, stats.seconds, stats.bytes / MB / max(stats.seconds, 1e-9), stats.skipped_files)
    return stats


def _upload(store: Store, local_dir: Path, files: list[dict[str, Any]], session: sessions.Session, stats: Stats, uri: str) -> None:
    base = session.base
    log.info("uploading %d files, %.1f MB to %s", len(files), sum(f["size"] for f in files) / MB, uri)

    def one(entry: dict[str, Any]) -> None:
        if session.lost.is_set():
            session.check()
        entry["sha256"], skipped = store.upload(local_dir / entry["path"], base + entry["path"], entry["size"], stats)
        if skipped:
            stats.skipped_files += 1
            stats.skipped_bytes += entry["size"]
        else:
            stats.bytes += entry["size"]

    # large files first so that the pool never ends waiting on one big straggler
    with ThreadPoolExecutor(store.tuning.concurrency) as pool:
        list(pool.map(one, sorted(files, key=lambda f: -f["size"])))
        # check before committing: a store that lost objects mid-upload (a server
        # restarted from an empty volume) gets them again instead of a broken manifest
        lost = [f for f in files if store.size(base + f["path"]) != f["size"]]
        if lost:
            log.warning("%d files went missing from %s during the upload; sending them again", len(lost), uri)
            list(pool.map(one, lost))
        if any(store.size(base + f["path"]) != f["size"] for f in lost):
            raise UserError(f"{store.describe(base)}: objects keep disappearing after upload; check the store")


def _list(local_dir: Path) -> list[dict[str, Any]]:
    """The files to upload, by path: ``{"path", "size"}`` (SHA-256 is added while uploading)."""
    if not local_dir.is_dir():
        raise UserError.field("artifact", str(local_dir), "no such local directory to upload")
    paths = sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.name.endswith(".part"))
    return [{"path": p.relative_to(local_dir).as_posix(), "size": p.stat().st_size} for p in paths]


def _shape(files: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(f["path"], f["size"]) for f in files]


def get_dir(uri: str, local_dir: str | Path, tuning: Tuning | None = None, plain_ok: bool = False, tree: str | None = None,
            pins: list[dict[str, Any]] | None = None) -> Stats:
    """Download the committed artifact at ``uri`` into ``local_dir``, verifying every file.

    With ``plain_ok``, a prefix without a manifest (a model someone copied there with
    another tool) is downloaded as it is, each object read with ``If-Match`` on the ETag
    it was listed with (``Stats.objects``), so an object replaced meanwhile is refused.
    With ``tree``, the committed content must be that version (a pointer to it was taken
    earlier); ``pins`` are a plain prefix's objects as listed then (``pin``). A version
    replaced by another writer while it is read is left for the new one, unless pinned."""
    tuning = tuning or Tuning()
    start = time.monotonic()
    local_dir = Path(local_dir)
    store = open_store(uri, tuning)
    try:
        for attempt in range(3):
            manifest = read_manifest(store)
            try:
                stats = _get_version(store, uri, local_dir, manifest, plain_ok, tree, pins)
                break
            except UserError:
                if manifest is None or tree or attempt == 2 or read_manifest(store) == manifest:
                    raise
                log.info("%s: another writer committed a new version while it was read; reading that one", uri)
    finally:
        store.close()
    stats.seconds = time.monotonic() - start
    log.info("downloaded %s: %.1f MB in %.1fs (%.0f MB/s)", uri, stats.bytes / MB, stats.seconds, stats.bytes / MB / max(stats.seconds, 1e-9))
    return stats


def pin(uri: str, tuning: Tuning | None = None) -> dict[str, Any]:
    """What a pointer to ``uri`` must hold so that every later read gets exactly what is
    there now: the committed ``tree``, or for a prefix without a manifest its objects
    with their ETags (and a ``tree`` hashed from them)."""
    store = open_store(uri, tuning or Tuning())
    try:
        manifest = read_manifest(store)
        if manifest is not None:
            return {"tree": manifest["tree"], "bytes": sum(f["size"] for f in manifest["files"]), "plain": False}
        objects = _plain_objects(store)
    finally:
        store.close()
    return {"tree": tree_id(objects), "bytes": sum(o["size"] for o in objects), "plain": True, "objects": objects}


def _plain_objects(store: Store) -> list[dict[str, Any]]:
    listed = plain_files(store.list_versions(""), store.describe(""), skip=(DATA + "/", MANIFEST, PENDING))
    if not listed:
        raise UserError(f"{store.describe('')}: nothing there (no objects under this prefix)")
    return [{"path": key, "size": size, "etag": tag} for key, size, tag in listed]


def _get_version(store: Store, uri: str, local_dir: Path, manifest: dict[str, Any] | None, plain_ok: bool, tree: str | None,
                 pins: list[dict[str, Any]] | None) -> Stats:
    if manifest is None:
        if not plain_ok:
            raise UserError(f"{store.describe(MANIFEST)}: no committed artifact there (no manifest: nothing was uploaded, or the upload did not finish)")
        objects = _plain_objects(store)
        if (pins is not None and objects != pins) or (tree and tree_id(objects) != tree):
            raise UserError(f"{store.describe('')}: the objects under this prefix changed since the pipeline read them (a model source "
                            "must not change while a pipeline uses it); rerun from the import step (llmpress run --no-cache)")
        files, base = [{"path": o["path"], "size": o["size"], "sha256": None, "etag": o["etag"]} for o in objects], ""
        log.info("%s has no llmpress manifest: downloading the prefix as it is (each object as listed: size and ETag)", uri)
    else:
        files, base = manifest["files"], manifest["data"]
        if tree and manifest.get("tree") != tree:
            raise UserError(f"{store.describe(MANIFEST)}: holds version {manifest.get('tree')}, not the version {tree} this step was given "
                            "(the artifact was overwritten since); rerun the step that produced it")
    stats = Stats(files=len(files), tree=manifest["tree"] if manifest else tree_id([{k: f[k] for k in ("path", "size", "etag")} for f in files]))
    local_dir.mkdir(parents=True, exist_ok=True)
    needed, free = sum(f["size"] for f in files), shutil.disk_usage(local_dir).free
    if needed > free:  # also what stops a manifest that claims a petabyte
        raise UserError(f"{store.describe(MANIFEST)}: {needed / MB:.0f} MB to download, more than the {free / MB:.0f} MB free in {local_dir}")
    log.info("downloading %d files, %.1f MB from %s", len(files), needed / MB, uri)
    targets = {f["path"]: local_target(local_dir, f["path"], store.describe(base + f["path"])) for f in files}  # all checked before any write

    def one(entry: dict[str, Any]) -> None:
        target = targets[entry["path"]]
        if target.is_file() and target.stat().st_size == entry["size"] and entry["sha256"] and sha256_file(target) == entry["sha256"]:
            stats.skipped_files += 1
            stats.skipped_bytes += entry["size"]
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        local_target(local_dir, entry["path"], store.describe(base + entry["path"]))  # again: a folder made meanwhile may be a link
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")  # per reader: two downloads into one folder never share it
        try:
            store.download(base + entry["path"], partial, entry["size"], entry.get("etag"))
            if entry["sha256"] and sha256_file(partial) != entry["sha256"]:
                where = store.describe(base + entry["path"])
                raise UserError(f"{where}: checksum mismatch — the stored object differs from its manifest; re-upload the artifact")
            if partial.stat().st_size != entry["size"]:
                raise UserError(f"{store.describe(base + entry['path'])}: size changed while downloading; retry")
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, target)  # a reader of local_dir never sees half a file under its real name
        stats.bytes += entry["size"]

    with ThreadPoolExecutor(store.tuning.concurrency) as pool:
        list(pool.map(one, sorted(files, key=lambda f: -f["size"])))
    return stats


def get_file(uri: str, path: str | Path, tuning: Tuning | None = None) -> Path:
    """Download one object (a dataset file) to ``path``; its size is checked."""
    tuning = tuning or Tuning()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parent, _, name = uri.rstrip("/").rpartition("/")
    store = open_store(parent, tuning)
    try:
        size = store.size(name)
        if size is None:
            raise UserError(f"{store.describe(name)}: no such object")
        store.download(name, path, size)
    finally:
        store.close()
    return path
