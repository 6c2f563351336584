"""The tracking spool: MLflow records kept while the server cannot be reached.

A spool is a folder or an S3 prefix (the artifact store's interface), so that records
written in a pod outlive it. Layout::

    records/<time ns>-<record id>.json   one record each, replayed in name order
    blobs/<record id>/<file name>         the file of a log_artifact record
    ids.json                              placeholder run id -> real run id

Replay applies each record, writes the id map, then deletes the record: a record is
gone only once applied, and applying the rare record that was applied but not yet
deleted (a crash in between) again is harmless (run creation and model registration
look for their spool id first; MLflow stores a repeated metric point once).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmpress.components import artifacts
from llmpress.components.artifacts.validation import local_target
from llmpress.components.errors import UserError

RECORDS = "records/"
BLOBS = "blobs/"
IDS = "ids.json"
CREATES = ("create_run", "attach", "create_model")  # records whose result is an id (a placeholder while spooled)


def write(spool: str, record: dict[str, Any], local_file: Path | None = None) -> None:
    """Add one record (and the file it logs) to the spool."""
    store = artifacts.open_store(spool)
    try:
        if local_file is not None:
            record = {**record, "blob": f"{BLOBS}{record['id']}/{record['name']}"}
            store.write_bytes(record["blob"], Path(local_file).read_bytes())  # reports and plots: small files
        store.write_bytes(f"{RECORDS}{time.time_ns():020d}-{record['id']}.json", json.dumps(record).encode())
    finally:
        store.close()


def pending(spool: str) -> int:
    """How many records wait for a replay."""
    store = artifacts.open_store(spool)
    try:
        return len(store.list(RECORDS))
    finally:
        store.close()


def read_ids(spool: str) -> dict[str, str]:
    store = artifacts.open_store(spool)
    try:
        raw = store.read_bytes(IDS)
    finally:
        store.close()
    return _ids(raw, spool)


def _ids(raw: bytes | None, where: str) -> dict[str, str]:
    try:
        ids = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        ids = None
    if not isinstance(ids, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ids.items()):
        raise UserError(f"{where}: not an llmpress spool id map (placeholder -> run id); remove it to replay")
    return ids


def replay(spool: str, apply: Callable[[dict[str, Any], Path | None], Any]) -> int:
    """Apply every record in order; returns how many. Stops at the first failure,
    leaving that record and the ones after it for the next replay."""
    store = artifacts.open_store(spool)
    applied = 0
    try:
        ids = _ids(store.read_bytes(IDS), store.describe(IDS))
        for key, _ in sorted(store.list(RECORDS)):
            raw = store.read_bytes(key)
            if raw is None:  # replayed meanwhile by another process
                continue
            record = _checked(raw, store.describe(key))
            resolved = dict(record)
            for field in ("parent", "source", "model"):
                if record.get(field):
                    resolved[field] = ids.get(record[field], record[field])
            if record.get("run") and record["op"] not in CREATES:  # a create keeps its placeholder: apply() looks it up
                resolved["run"] = ids.get(record["run"], record["run"])
            with tempfile.TemporaryDirectory() as tmp:
                blob = None
                if record.get("blob"):
                    blob = local_target(Path(tmp), record["name"], store.describe(key))
                    blob.write_bytes(store.read_bytes(record["blob"]) or b"")
                result = apply(resolved, blob)
            if record["op"] in CREATES:
                ids[record["run"]] = result
                store.write_bytes(IDS, json.dumps(ids, indent=1).encode())
            store.delete([key] + ([record["blob"]] if record.get("blob") else []))
            applied += 1
    finally:
        store.close()
    return applied


def _checked(raw: bytes, where: str) -> dict[str, Any]:
    """A spooled record as written by ``write``, or one line: the spool may sit on a
    bucket others can write, and replay runs with the step's MLflow credentials."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("op"), str) or not isinstance(record.get("id"), str):
        raise UserError(f"{where}: not an llmpress spool record; remove it to replay the rest")
    if "blob" in record:
        name = record.get("name")
        if not isinstance(name, str) or "/" in name or record["blob"] != f"{BLOBS}{record['id']}/{name}":
            raise UserError(f"{where}: its file {record.get('blob')!r} is not {BLOBS}<record id>/<file name>; refusing to replay it")
    return record
