"""Faults on a real S3 server: killed (SIGKILL) in the middle of an upload.

Each test gets its own server process, killed from inside the upload once a third of
the bytes have moved, while a reader polls the artifact the whole time. SeaweedFS (the
default, tests/servers.py) restarts with what it had on disk, so the rerun finds the
finished files and parts; moto (LLMPRESS_TEST_S3_SERVER=moto) restarts empty, as a store
that lost its volume would, and the bucket is created again.
"""

from __future__ import annotations

import threading
import time

import boto3
import pytest
from llmpress.components import artifacts
from llmpress.components.artifacts import DATA, MANIFEST, Tuning
from llmpress.components.errors import UserError
from servers import s3_env, s3_server
from test_artifacts import MB, SMALL_PARTS, digests, keys, make_dir


@pytest.fixture
def own_server(tmp_path, monkeypatch):
    server = s3_server(tmp_path).start()
    for key, value in s3_env(server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    ensure_bucket("models")
    yield server
    server.kill()


def ensure_bucket(name: str) -> None:
    client = boto3.client("s3")
    if name not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=name)


class Reader(threading.Thread):
    """Polls the artifact while it is written; records every state it saw."""

    def __init__(self, uri: str, tmp, expected: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.uri, self.tmp, self.expected = uri, tmp, expected
        self.stop, self.seen = threading.Event(), []

    def run(self) -> None:
        quick = Tuning(retry_seconds=0.5, concurrency=2)
        for i in range(2000):  # bounded: at most a few hundred polls happen in practice
            if self.stop.is_set():
                return
            try:
                if not artifacts.exists(self.uri, quick):
                    self.seen.append("absent")
                    continue
                target = self.tmp / f"read-{i}"
                artifacts.get_dir(self.uri, target, quick)
                self.seen.append("complete" if digests(target) == self.expected else "PARTIAL")
            except UserError:
                self.seen.append("unreachable")
            time.sleep(0.05)


def kill_when(server, limit: int) -> Tuning:
    moved, killed = [0], threading.Event()

    def progress(n: int) -> None:
        moved[0] += n
        if moved[0] >= limit and not killed.is_set():
            killed.set()
            server.kill()

    return Tuning(concurrency=2, part_size=SMALL_PARTS, retry_seconds=2, progress=progress)


def test_upload_killed_mid_way_then_rerun_completes_with_nothing_lost_or_duplicated(own_server, tmp_path):
    src = make_dir(tmp_path / "src")
    expected, uri = digests(src), "s3://models/runs/m1"
    reader = Reader(uri, tmp_path, expected)
    reader.start()
    failed: list[BaseException] = []
    upload = threading.Thread(target=lambda: _catch(failed, artifacts.put_dir, src, uri, kill_when(own_server, 7 * MB)))
    upload.start()
    upload.join(timeout=120)
    assert not upload.is_alive() and isinstance(failed[0], UserError) and "gave up" in str(failed[0])

    own_server.start()
    ensure_bucket("models")
    stats = artifacts.put_dir(src, uri, Tuning(concurrency=2, part_size=SMALL_PARTS, retry_seconds=30))
    time.sleep(0.5)  # let the reader see the committed artifact too
    reader.stop.set()
    reader.join(timeout=60)

    assert stats.files == 5
    if own_server.name.startswith("seaweedfs"):  # kept its data across the restart: the rerun reuses what got there
        assert stats.reused_parts + stats.skipped_files > 0
    artifacts.get_dir(uri, tmp_path / "dst", Tuning(part_size=SMALL_PARTS))
    assert digests(tmp_path / "dst") == expected
    stored = keys("models", "runs/m1/")
    assert stored.count(f"runs/m1/{MANIFEST}") == 1 and len([k for k in stored if f"/{DATA}/" in k]) == len(expected)
    assert not boto3.client("s3").list_multipart_uploads(Bucket="models").get("Uploads")
    assert "PARTIAL" not in reader.seen and "absent" in reader.seen and reader.seen[-1] == "complete"


def _catch(errors: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as err:  # noqa: B036 - the test thread reports whatever ended it
        errors.append(err)
