"""The local-folder backend of the artifact store: the same layout and guarantees as S3,
on a local or mounted disk. A writer's temporary names carry its process and a random
part, so two writers of one folder never share one; conditional writes (the manifest
commit, upload leases) hold an exclusive lock on ``.llmpress-lock``."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from llmpress.components.artifacts import HASH_CHUNK, Stats, Tuning, sha256_file
from llmpress.components.artifacts.validation import relative_path
from llmpress.components.errors import UserError

LOCK = ".llmpress-lock"


def _version(path: Path) -> str:
    """A local file's version: replaced or rewritten, its inode, size or time changes."""
    st = path.stat()
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _create(path: Path, attempts: int = 5) -> BinaryIO:
    """``open(path, "wb")``, making its folder: another writer's cleanup removes folders it
    leaves empty (``LocalStore.delete``), so one made here can vanish before the open."""
    for attempt in range(attempts):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return open(path, "wb")
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


class LocalStore:
    """A folder on a local or mounted disk, with the same layout and guarantees."""

    def __init__(self, uri: str, tuning: Tuning) -> None:
        self.root = Path(str(uri).removeprefix("file://")).expanduser()
        self.tuning = tuning

    def describe(self, key: str) -> str:
        return str(self.root / key)

    def _path(self, key: str) -> Path:
        """A key as a path inside the store's folder (keys may come from a spool record)."""
        return self.root / relative_path(key, self.describe(key)) if key else self.root

    def read_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic on one filesystem: the commit

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        data = self.read_bytes(key)
        return data, None if data is None else hashlib.sha256(data).hexdigest()

    @property
    def conditional(self) -> bool:
        return True  # write_if holds a lock file: every writer of one folder goes through it

    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Write ``key`` only if it still is the version ``tag`` names (None: absent).
        An exclusive ``flock`` on the store's lock file makes compare and replace one step
        for every process on this machine (and on NFS v4, which forwards locks)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.read_tagged(key)[1] != tag:
                    return False
                self.write_bytes(key, data)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def upload(self, path: Path, key: str, size: int, stats: Stats) -> tuple[str, bool]:
        target = self._path(key)
        if target.is_file() and target.stat().st_size == size:  # an interrupted run's file
            digest = sha256_file(path)
            if sha256_file(target) == digest:
                return digest, True
        tmp = _temporary(target)
        digest = hashlib.sha256()
        buffer = bytearray(HASH_CHUNK)
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as source, _create(tmp) as out:  # one read: copy and hash
            while n := source.readinto(buffer):
                digest.update(view[:n])
                out.write(view[:n])
                if self.tuning.progress:
                    self.tuning.progress(n)
        os.replace(tmp, target)
        return digest.hexdigest(), False

    def abort_uploads(self, prefix: str) -> None:
        for tmp in self._path(prefix.rstrip("/")).rglob(".*.tmp") if self._path(prefix.rstrip("/")).is_dir() else []:
            tmp.unlink(missing_ok=True)  # half-copied files of an abandoned upload

    def download(self, key: str, path: Path, size: int, tag: str | None = None) -> None:
        source = self._path(key)
        if not source.is_file():
            raise UserError(f"{source}: missing although the manifest lists it; re-upload the artifact")
        self._copy(source, path)
        if tag is not None and _version(source) != tag:
            raise UserError(f"{source}: changed since it was listed (a model source must not change while a pipeline uses it); rerun from the import step")

    def _copy(self, source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(target)
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        if self.tuning.progress:
            self.tuning.progress(target.stat().st_size)

    def list_versions(self, prefix: str) -> list[tuple[str, int, str]]:
        return [(key, size, _version(self._path(key))) for key, size in self.list(prefix)]

    def list(self, prefix: str) -> list[tuple[str, int]]:
        base = self._path(prefix.rstrip("/"))
        found = []
        for p in sorted(base.rglob("*")) if base.exists() else []:
            if p.name == LOCK or (p.name.startswith(".") and p.name.endswith(".tmp")):
                continue
            try:
                if p.is_file():
                    found.append((p.relative_to(self.root).as_posix(), p.stat().st_size))
            except FileNotFoundError:  # another writer collected it between the listing and now
                continue
        return found

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        for folder in sorted({self._path(k).parent for k in keys}, key=lambda p: -len(p.parts)):
            while folder != self.root and folder.is_relative_to(self.root):  # empty folders of a deleted version go too
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent

    def close(self) -> None:
        pass
