"""Upload sessions: one per writer, so that any number of writers of one artifact URI
and a crash at any point leave readers one complete committed version.

Each upload writes under its own data prefix ``llmpress-data/<session>/``, announced
first by a marker ``llmpress-pending/<session>.json`` that names its owner and is
refreshed (a lease) while the upload runs. Rules:

* A writer never writes under a committed prefix: a session the manifest names is
  never taken over, whatever its marker says.
* A session is taken over (a rerun resumes it) only when its lease was released (the
  writer failed with an error) or expired (it was killed), and only by a conditional
  rewrite of its marker: of two writers racing for it, one wins, the other starts a
  session of its own. Without conditional writes nothing is taken over.
* The commit is a conditional write of the manifest on the version read before it
  (``If-Match``, or ``If-None-Match: *`` for the first); a writer that loses the race
  reads the winner and commits on top of it (last writer wins, each version whole).
  Without conditional writes the commit is a plain PUT read back (docs/artifacts.md).
* After its commit a writer deletes what it replaced, its marker, and sessions that are
  garbage: data without a marker that no manifest names, and released or expired
  sessions (claimed first, so a resumer and a collector never both get one). A
  failure here leaves garbage, never a broken version, and the next writer collects it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any

from llmpress.components.artifacts.validation import DATA, SESSION
from llmpress.components.errors import UserError

log = logging.getLogger("llmpress.artifacts")

PENDING = "llmpress-pending"  # PENDING/<session>.json: one marker per upload not committed yet


def lease_seconds() -> float:
    """How long a writer's marker stays its own without a refresh."""
    return float(os.environ.get("LLMPRESS_UPLOAD_LEASE_SECONDS", "120"))


def marker_key(session: str) -> str:
    return f"{PENDING}/{session}.json"


def data_prefix(session: str) -> str:
    return f"{DATA}/{session}/"


def _marker(session: str, shape: list[tuple[str, int]], owner: str, released: bool = False) -> bytes:
    return json.dumps({"session": session, "files": shape, "owner": owner, "heartbeat": time.time(), "released": released}).encode()


def _parse_marker(raw: bytes | None) -> dict[str, Any] | None:
    """A marker as written by ``_marker``, or None (garbage, to be collected)."""
    try:
        marker = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("session"), str) or not SESSION.fullmatch(marker["session"]):
        return None
    if not isinstance(marker.get("heartbeat"), int | float) or not isinstance(marker.get("files"), list):
        return None
    return marker


_ended_here: set[str] = set()  # owners of uploads that failed in this process: dead even if their release could not be written


def _free(marker: dict[str, Any]) -> bool:
    """Released by its writer, not refreshed within the lease (the writer died), or its
    writer failed in this process (the store was away when it tried to release)."""
    return bool(marker.get("released")) or marker.get("owner") in _ended_here or time.time() - marker["heartbeat"] > lease_seconds()


def committed_session(manifest: dict[str, Any] | None) -> str | None:
    return manifest["data"].split("/")[1] if manifest else None


class Session:
    """This writer's upload session: claimed or new, its lease refreshed on a thread."""

    def __init__(self, store: Any, shape: list[tuple[str, int]], manifest: dict[str, Any] | None) -> None:
        self.store, self.shape, self.owner = store, shape, uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self.id, self._tag = self._claim(committed_session(manifest))
        self._thread = threading.Thread(target=self._refresh, name="llmpress-lease", daemon=True)
        self._thread.start()

    @property
    def base(self) -> str:
        return data_prefix(self.id)

    def _claim(self, committed: str | None) -> tuple[str, str | None]:
        if self.store.conditional:
            for key, _ in self.store.list(f"{PENDING}/"):
                raw, tag = self.store.read_tagged(key)
                marker = _parse_marker(raw)
                if (marker is None or marker["session"] == committed or key != marker_key(marker["session"]) or not _free(marker)
                        or [tuple(f) for f in marker["files"] if isinstance(f, list)] != self.shape):
                    continue
                if self.store.write_if(key, _marker(marker["session"], self.shape, self.owner), tag):
                    log.info("resuming the unfinished upload %s", marker["session"])
                    return marker["session"], self.store.read_tagged(key)[1]
        session = uuid.uuid4().hex
        data = _marker(session, self.shape, self.owner)
        if self.store.conditional:
            self.store.write_if(marker_key(session), data, None)
        else:
            self.store.write_bytes(marker_key(session), data)
        return session, self.store.read_tagged(marker_key(session))[1]

    def _refresh(self) -> None:
        while not self._stop.wait(lease_seconds() / 4):
            try:
                self._tag = self._rewrite(released=False)
            except UserError:
                self.lost.set()
                return
            except Exception as err:  # the store is away: the upload itself will find out and retry
                log.warning("could not refresh the lease of upload %s: %s", self.id, type(err).__name__)

    def _rewrite(self, released: bool) -> str | None:
        key, data = marker_key(self.id), _marker(self.id, self.shape, self.owner, released)
        if self.store.conditional:
            if not self.store.write_if(key, data, self._tag):
                raise UserError(f"{self.store.describe(key)}: another writer took over this upload (this one stalled for longer than the "
                                f"{lease_seconds():.0f} s lease, LLMPRESS_UPLOAD_LEASE_SECONDS); rerun")
        else:
            self.check()
            self.store.write_bytes(key, data)
        return self.store.read_tagged(key)[1]

    def check(self) -> None:
        """Refuse to go on when the marker is no longer this writer's."""
        marker = _parse_marker(self.store.read_bytes(marker_key(self.id)))
        if self.lost.is_set() or marker is None or marker.get("owner") != self.owner:
            raise UserError(f"{self.store.describe(marker_key(self.id))}: another writer took over or collected this upload (this one stalled "
                            f"for longer than the {lease_seconds():.0f} s lease, LLMPRESS_UPLOAD_LEASE_SECONDS); rerun")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def release(self) -> None:
        """After a failure: a rerun may take the session over at once."""
        _ended_here.add(self.owner)
        self.stop()
        try:
            self._rewrite(released=True)
        except Exception as err:  # the lease then simply expires
            log.warning("could not release upload %s (%s); a rerun may resume it after the lease", self.id, type(err).__name__)


def commit(store: Any, manifest_key: str, manifest: dict[str, Any], read_before: tuple[dict[str, Any] | None, str | None],
           read: Any) -> dict[str, Any] | None:
    """Write the manifest on top of the version read before; returns the version this
    commit replaced (whose data is now garbage), or None."""
    previous, tag = read_before
    data = json.dumps(manifest, indent=1).encode()
    if not store.conditional:
        store.write_bytes(manifest_key, data)
        return previous
    for _ in range(100):
        if store.write_if(manifest_key, data, tag):
            return previous
        previous, tag = read()  # another writer committed since: ours goes on top of it, whole
        log.info("another writer committed %s meanwhile; committing on top of it", previous and previous["tree"])
    raise UserError(f"{store.describe(manifest_key)}: the manifest keeps changing under this commit; is a writer looping?")


def collect(store: Any, own: str, replaced: dict[str, Any] | None, read_manifest: Any) -> None:
    """Delete what no reader can need any more: the version this commit replaced, this
    writer's marker, data without a marker that no manifest names, and sessions whose
    lease was released or expired. Order matters: data is listed before markers (a
    writer's marker is written before its data), the manifest read last."""
    data_sessions = {key.split("/")[1] for key, _ in store.list(f"{DATA}/") if key.count("/") >= 2}
    markers: dict[str, tuple[str, dict[str, Any] | None, str | None, bytes | None]] = {}
    for key, _ in store.list(f"{PENDING}/"):
        raw, tag = store.read_tagged(key)
        markers[key.removeprefix(f"{PENDING}/").removesuffix(".json")] = (key, _parse_marker(raw), tag, raw)
    current = committed_session(read_manifest())
    garbage = {session for session in data_sessions if session not in markers and session != current}
    if own != current:
        garbage.add(own)  # another writer committed on top of this one meanwhile
    done = {current, committed_session(replaced)}  # sessions a manifest named: their writers are past their commit
    if replaced and committed_session(replaced) != current:
        garbage.add(str(committed_session(replaced)))
    dead_markers = []
    for session, (key, marker, tag, raw) in markers.items():
        if session != own and not (marker is None or session in done or _free(marker)):
            continue  # a live writer's
        # claimed before deleting, so that a writer resuming it right now keeps it
        if session != own and store.conditional and raw is not None and not store.write_if(key, b'{"collecting": true}', tag):
            continue
        dead_markers.append(key)
        if session != current:
            garbage.add(session)
    for session in sorted(garbage):
        keys = [key for key, _ in store.list(data_prefix(session))]
        if keys:
            store.delete(keys)
        store.abort_uploads(data_prefix(session))
    if dead_markers:
        store.delete(dead_markers)
