"""Racing writers and crashes (components/artifacts/sessions.py): whatever the order, a
reader of the URI gets one complete committed version whose every checksum verifies.
On a local folder, on the suite's S3 server (SeaweedFS) and on moto; both servers
honour conditional writes, and the fallback for servers that do not is forced with
LLMPRESS_S3_CONDITIONAL=off."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
from pathlib import Path

import boto3
import pytest
from llmpress.components import artifacts
from llmpress.components.artifacts import DATA, PENDING, Tuning, sessions
from llmpress.components.errors import UserError
from llmpress.components.kubeflow import steps

MB = 1024 * 1024


def model(root: Path, seed: int) -> Path:
    """Same paths and sizes for every seed (the shape two racing writers share), other bytes."""
    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "weights.bin").write_bytes(rng.randbytes(11 * MB))  # multipart with 5 MB parts
    (root / "sub" / "config.json").write_bytes(rng.randbytes(300))
    return root


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def keys(uri: str, prefix: str) -> list[str]:
    if artifacts.is_s3(uri):
        bucket, _, base = uri.removeprefix("s3://").partition("/")
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{base}/{prefix}")
        return sorted(o["Key"].removeprefix(f"{base}/") for page in pages for o in page.get("Contents", []))
    root = Path(uri)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix().startswith(prefix))


def tuning(**kw) -> Tuning:
    return Tuning(**{"concurrency": 2, "part_size": 5 * MB, "retry_seconds": 20, **kw})


def read_back(uri: str, into: Path) -> dict[str, str]:
    """What a reader gets: get_dir verifies every checksum against the manifest."""
    artifacts.get_dir(uri, into, tuning())
    return digests(into)


def race(uri: str, sources: list[Path]) -> list[BaseException | artifacts.Stats]:
    """Writers that all start uploading before any of them commits."""
    barrier = threading.Barrier(len(sources), timeout=60)
    results: list[BaseException | artifacts.Stats] = [RuntimeError("did not run")] * len(sources)

    def write(i: int) -> None:
        met = []

        def progress(_: int) -> None:
            if not met:
                met.append(True)
                barrier.wait()  # every writer is mid-upload here

        try:
            results[i] = artifacts.put_dir(sources[i], uri, tuning(progress=progress))
        except BaseException as err:  # reported, not swallowed: the test asserts on it
            results[i] = err

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(sources))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


@pytest.mark.parametrize("same_content", [False, True], ids=["other-bytes", "same-bytes"])
def test_two_racing_writers_leave_one_complete_verified_version(store_uri, tmp_path, same_content):
    sources = [model(tmp_path / "a", 1), model(tmp_path / "b", 1 if same_content else 2)]
    results = race(store_uri, sources)
    assert all(isinstance(r, artifacts.Stats) for r in results), results
    got = read_back(store_uri, tmp_path / "read")
    assert got in (digests(sources[0]), digests(sources[1]))
    assert artifacts.committed(store_uri)["tree"] in {r.tree for r in results}
    assert keys(store_uri, PENDING) == []  # every marker collected
    assert len({k.split("/")[1] for k in keys(store_uri, DATA)}) == 1  # one version's data


def test_writers_never_share_an_upload_session(store_uri, tmp_path, monkeypatch):
    seen: list[str] = []
    original = sessions.Session._claim

    def recording(self, committed):
        claimed = original(self, committed)
        seen.append(claimed[0])
        return claimed

    monkeypatch.setattr(sessions.Session, "_claim", recording)
    race(store_uri, [model(tmp_path / "a", 1), model(tmp_path / "b", 2), model(tmp_path / "c", 3)])
    assert len(seen) == 3 and len(set(seen)) == 3


def test_racing_writers_without_conditional_writes_still_leave_one_verified_version(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRESS_S3_CONDITIONAL", "off")
    uri = f"s3://{s3_bucket}/m"
    sources = [model(tmp_path / "a", 1), model(tmp_path / "b", 2)]
    results = race(uri, sources)
    assert all(isinstance(r, artifacts.Stats) for r in results), results
    assert read_back(uri, tmp_path / "read") in (digests(sources[0]), digests(sources[1]))
    artifacts.put_dir(sources[0], uri, tuning())  # the next writer collects what the race left
    assert len({k.split("/")[1] for k in keys(uri, DATA)}) == 1 and keys(uri, PENDING) == []


def test_both_test_servers_honour_conditional_writes(store_uri):
    store = artifacts.open_store(store_uri)
    try:
        assert store.conditional
        assert store.write_if("probe.json", b"1", None) and not store.write_if("probe.json", b"2", None)
        _, tag = store.read_tagged("probe.json")
        assert not store.write_if("probe.json", b"3", '"0000"') and store.write_if("probe.json", b"4", tag)
        assert store.read_bytes("probe.json") == b"4"
    finally:
        store.close()


class Killed(BaseException):
    """The pod dies: nothing after this point runs."""


def test_a_crash_between_commit_and_cleanup_never_lets_a_writer_into_the_committed_prefix(store_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRESS_UPLOAD_LEASE_SECONDS", "0.2")  # the killed writer's lease has expired by the next upload
    first = model(tmp_path / "v1", 1)

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(sessions, "collect", killed)
        artifacts.put_dir(first, store_uri, tuning())
    committed = artifacts.committed(store_uri)
    assert keys(store_uri, PENDING) == [f"{PENDING}/{committed['data'].split('/')[1]}.json"]  # the marker the crash left

    class Interrupt(Exception):
        pass

    moved = [0]

    def interrupt(n: int) -> None:
        moved[0] += n
        if moved[0] > 6 * MB:
            raise Interrupt

    second = model(tmp_path / "v2", 2)  # same shape: the old code resumed into the committed prefix
    with pytest.raises(Interrupt):
        artifacts.put_dir(second, store_uri, tuning(progress=interrupt, concurrency=1))
    written = {k.split("/")[1] for k in keys(store_uri, DATA)} - {committed["data"].split("/")[1]}
    assert len(written) == 1  # the interrupted rewrite went to a session of its own
    assert artifacts.get_dir(store_uri, tmp_path / "read", tuning(), tree=committed["tree"]).tree == committed["tree"]
    assert digests(tmp_path / "read") == digests(first)
    third = artifacts.put_dir(second, store_uri, tuning())
    assert read_back(store_uri, tmp_path / "read-2") == digests(second) and third.tree == artifacts.committed(store_uri)["tree"]
    assert keys(store_uri, PENDING) == [] and len({k.split("/")[1] for k in keys(store_uri, DATA)}) == 1


def test_a_rerun_after_a_failed_upload_resumes_its_session(store_uri, tmp_path):
    src = model(tmp_path / "src", 1)

    class Interrupt(Exception):
        pass

    def interrupt(n: int) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        artifacts.put_dir(src, store_uri, tuning(progress=interrupt, concurrency=1))
    (marker,) = keys(store_uri, PENDING)
    again = artifacts.put_dir(src, store_uri, tuning())
    assert artifacts.committed(store_uri)["data"] == f"{DATA}/{marker.split('/')[1].removesuffix('.json')}/"  # the released session, taken over
    assert read_back(store_uri, tmp_path / "read") == digests(src) and again.tree


def test_a_reader_whose_version_is_replaced_mid_download_gets_the_new_one_whole(store_uri, tmp_path):
    v1, v2 = model(tmp_path / "v1", 1), model(tmp_path / "v2", 2)
    artifacts.put_dir(v1, store_uri, tuning())
    replaced = []

    def replace_once(_: int) -> None:
        if not replaced:
            replaced.append(True)
            artifacts.put_dir(v2, store_uri, tuning())  # commits v2 and deletes v1's data

    artifacts.get_dir(store_uri, tmp_path / "read", tuning(progress=replace_once, concurrency=1))
    assert digests(tmp_path / "read") == digests(v2)


# --- per-key delete errors (DeleteObjects answers 200 with errors inside) ------------

def per_key_errors(code: str, times: int):
    """An after-call hook on the real DeleteObjects call that adds per-key errors to the
    server's answer the way AWS reports them (the test servers never fail a key)."""
    left = [times]

    def hook(http_response, parsed, **kwargs):
        if left[0] > 0 and parsed.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200:
            left[0] -= 1
            parsed["Errors"] = [{"Key": "m/x", "Code": code, "Message": "injected per-key error"}]

    return hook


def with_hook(store, hook):
    store.client.meta.events.register("after-call.s3.DeleteObjects", hook)
    return store


def test_a_per_key_delete_error_is_raised_not_ignored(s3_bucket):
    store = with_hook(artifacts.open_store(f"s3://{s3_bucket}/m", tuning()), per_key_errors("AccessDenied", 1))
    try:
        store.write_bytes("x", b"1")
        with pytest.raises(UserError, match=rf"s3://{s3_bucket}/m/x: not deleted — AccessDenied: injected per-key error"):
            store.delete(["x"])
    finally:
        store.close()


def test_a_transient_per_key_delete_error_is_retried(s3_bucket):
    store = with_hook(artifacts.open_store(f"s3://{s3_bucket}/m", tuning()), per_key_errors("InternalError", 2))
    try:
        store.write_bytes("x", b"1")
        store.delete(["x"])
        assert store.read_bytes("x") is None
    finally:
        store.close()


def test_a_failed_cleanup_after_commit_keeps_the_version_and_the_next_writer_collects(s3_bucket, tmp_path, monkeypatch, caplog):
    uri = f"s3://{s3_bucket}/m"
    artifacts.put_dir(model(tmp_path / "v1", 1), uri, tuning())
    original = artifacts.open_store
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="llmpress"):
        patch.setattr(artifacts, "open_store", lambda u, t=None: with_hook(original(u, t), per_key_errors("AccessDenied", 100)))
        artifacts.put_dir(model(tmp_path / "v2", 2), uri, tuning())
    assert "cleaning up after it failed" in caplog.text
    assert len(keys(uri, PENDING)) == 1  # the cleanup stopped before the writer's marker went
    assert read_back(uri, tmp_path / "read") == digests(tmp_path / "v2")
    artifacts.put_dir(model(tmp_path / "v3", 3), uri, tuning())
    assert len({k.split("/")[1] for k in keys(uri, DATA)}) == 1 and keys(uri, PENDING) == []


# --- model sources are pinned -------------------------------------------------------

def plain_source(bucket: str) -> str:
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="hf/m/config.json", Body=b'{"a": 1}')
    client.put_object(Bucket=bucket, Key="hf/m/model.safetensors", Body=b"w" * 1000)
    return f"s3://{bucket}/hf/m"


def test_a_plain_source_is_pinned_by_the_etags_it_was_imported_with(s3_bucket, tmp_path):
    source = plain_source(s3_bucket)
    kfp_dir = tmp_path / "kfp-model"
    steps.import_model(json.dumps({"source": source}), json.dumps({"recipe": "pin", "experiment": "t", "storage": f"s3://{s3_bucket}/root"}),
                       str(kfp_dir))
    ref = json.loads((kfp_dir / steps.POINTER).read_text())
    assert ref["plain"] and len(ref["tree"]) == 16 and [o["path"] for o in ref["objects"]] == ["config.json", "model.safetensors"]
    assert all(o["etag"] for o in ref["objects"])
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="hf/m/model.safetensors", Body=b"X" * 1000)  # same size, other bytes
    with pytest.raises(UserError) as err, steps.model_input(str(kfp_dir)):
        pass
    (line,) = err.value.problems
    assert line.startswith(f"{source}/: the objects under this prefix changed since the pipeline read them")


def test_an_object_replaced_while_it_is_read_is_refused(s3_bucket, tmp_path):
    source = plain_source(s3_bucket)
    changed = []

    def change_once(_: int) -> None:
        if not changed:
            changed.append(True)
            boto3.client("s3").put_object(Bucket=s3_bucket, Key="hf/m/config.json", Body=b'{"a": 2}')

    with pytest.raises(UserError) as err:
        artifacts.get_dir(source, tmp_path / "dst", tuning(progress=change_once, concurrency=1), plain_ok=True)
    (line,) = err.value.problems
    assert line.startswith(f"{source}/config.json: PreconditionFailed — the object changed since it was listed")
    assert not (tmp_path / "dst" / "config.json").exists()
