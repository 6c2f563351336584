"""The artifact store against a real S3-compatible server on 127.0.0.1 (and a local folder)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import boto3
import pytest
from llmpress.components import artifacts
from llmpress.components.artifacts import DATA, MANIFEST, Tuning
from llmpress.components.errors import UserError

MB = 1024 * 1024
SMALL_PARTS = 5 * MB  # S3's smallest part: small test files still go up as multipart


def make_dir(root: Path, seed: int = 0) -> Path:
    """A model-like folder: two multipart-sized weight files, small JSON files, an empty file."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model-00001.safetensors").write_bytes(rng.randbytes(12 * MB + 3))
    (root / "model-00002.safetensors").write_bytes(rng.randbytes(7 * MB))
    (root / "config.json").write_text(f'{{"seed": {seed}}}')
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "tokenizer.json").write_text("x" * 1000)
    (root / "empty.txt").write_bytes(b"")
    return root


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def tuning(**kw) -> Tuning:
    return Tuning(**{"concurrency": 4, "part_size": SMALL_PARTS, "retry_seconds": 30, **kw})


class Interrupt(Exception):
    pass


def interrupt_after(limit: int) -> Tuning:
    """A transfer that dies (as a killed pod would) once ``limit`` bytes have moved."""
    moved = [0]

    def progress(n: int) -> None:
        moved[0] += n
        if moved[0] >= limit:
            raise Interrupt

    return tuning(progress=progress, concurrency=1)


def test_s3_round_trip_keeps_every_byte_and_path(s3_bucket, tmp_path):
    src = make_dir(tmp_path / "src")
    uri = f"s3://{s3_bucket}/runs/m1"
    up = artifacts.put_dir(src, uri, tuning())
    down = artifacts.get_dir(uri, tmp_path / "dst", tuning())
    assert digests(tmp_path / "dst") == digests(src)
    assert (up.files, up.skipped_files) == (5, 0) and up.bytes == down.bytes == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


def test_local_folder_store_has_the_same_interface_and_layout(tmp_path):
    src = make_dir(tmp_path / "src")
    store = tmp_path / "store" / "m1"
    artifacts.put_dir(src, str(store))
    assert artifacts.exists(str(store)) and (store / MANIFEST).is_file()
    artifacts.get_dir(str(store), tmp_path / "dst")
    assert digests(tmp_path / "dst") == digests(src)


def test_manifest_lists_sha256_of_every_file(s3_bucket, tmp_path):
    import json

    src = make_dir(tmp_path / "src")
    artifacts.put_dir(src, f"s3://{s3_bucket}/m", tuning())
    manifest = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key=f"m/{MANIFEST}")["Body"].read())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == digests(src)


def test_upload_without_its_manifest_is_never_read(s3_bucket, tmp_path):
    src = make_dir(tmp_path / "src")
    uri = f"s3://{s3_bucket}/m"
    with pytest.raises(Interrupt):
        artifacts.put_dir(src, uri, interrupt_after(15 * MB))
    assert keys(s3_bucket, f"m/{DATA}/")  # a whole file is there...
    assert not artifacts.exists(uri)  # ...but no artifact
    with pytest.raises(UserError, match=f"s3://{s3_bucket}/m/{MANIFEST}: no committed artifact"):
        artifacts.get_dir(uri, tmp_path / "dst", tuning())
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").rglob("*.safetensors"))


def test_interrupted_upload_resumes_reusing_finished_files_and_parts(s3_bucket, tmp_path):
    src = make_dir(tmp_path / "src")
    uri = f"s3://{s3_bucket}/m"
    with pytest.raises(Interrupt):
        artifacts.put_dir(src, uri, interrupt_after(15 * MB))  # the 12 MB file is done, the 7 MB one has a part
    again = artifacts.put_dir(src, uri, tuning())
    assert again.skipped_files >= 1 and again.reused_parts >= 1
    assert again.bytes < sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) - 12 * MB
    artifacts.get_dir(uri, tmp_path / "dst", tuning())
    assert digests(tmp_path / "dst") == digests(src)
    assert not boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_rerun_with_unchanged_content_moves_nothing(s3_bucket, tmp_path):
    src = make_dir(tmp_path / "src")
    uri = f"s3://{s3_bucket}/m"
    artifacts.put_dir(src, uri, tuning())
    again = artifacts.put_dir(src, uri, tuning())
    assert (again.bytes, again.skipped_files) == (0, 5)


def test_new_content_replaces_the_old_version_whole(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/m"
    artifacts.put_dir(make_dir(tmp_path / "v1", seed=1), uri, tuning())
    v2 = make_dir(tmp_path / "v2", seed=2)
    (v2 / "model-00002.safetensors").unlink()
    artifacts.put_dir(v2, uri, tuning())
    artifacts.get_dir(uri, tmp_path / "dst", tuning())
    assert digests(tmp_path / "dst") == digests(v2)
    data_keys = keys(s3_bucket, f"m/{DATA}/")
    assert len(data_keys) == 4 and len({k.split("/")[2] for k in data_keys}) == 1  # one version, old one gone


def test_download_verifies_checksums(s3_bucket, tmp_path):
    src = make_dir(tmp_path / "src")
    uri = f"s3://{s3_bucket}/m"
    artifacts.put_dir(src, uri, tuning())
    (key,) = [k for k in keys(s3_bucket, f"m/{DATA}/") if k.endswith("config.json")]
    boto3.client("s3").put_object(Bucket=s3_bucket, Key=key, Body=b'{"seed": 9}')  # same size, other bytes
    with pytest.raises(UserError, match=f"s3://{s3_bucket}/{key}: checksum mismatch"):
        artifacts.get_dir(uri, tmp_path / "dst", tuning())
    assert not (tmp_path / "dst" / "config.json").exists()


def test_missing_bucket_is_one_line_naming_bucket_and_key(s3_bucket, tmp_path):
    with pytest.raises(UserError) as err:
        artifacts.put_dir(make_dir(tmp_path / "src"), "s3://no-such-bucket-llmpress/models/m1", tuning())
    (line,) = err.value.problems
    assert line.startswith("s3://no-such-bucket-llmpress/models/m1/") and "NoSuchBucket" in line


def test_plain_prefix_without_manifest_downloads_when_allowed(s3_bucket, tmp_path):
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="hf/llama/config.json", Body=b"{}")
    client.put_object(Bucket=s3_bucket, Key="hf/llama/model.safetensors", Body=b"w" * 100)
    artifacts.get_dir(f"s3://{s3_bucket}/hf/llama", tmp_path / "dst", tuning(), plain_ok=True)
    assert sorted(digests(tmp_path / "dst")) == ["config.json", "model.safetensors"]


def test_single_object_download_for_data_files(s3_bucket, tmp_path):
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="data/eval.txt", Body=b"hello world")
    path = artifacts.get_file(f"s3://{s3_bucket}/data/eval.txt", tmp_path / "eval.txt")
    assert path.read_bytes() == b"hello world"
    with pytest.raises(UserError, match=f"s3://{s3_bucket}/data/missing.txt: no such object"):
        artifacts.get_file(f"s3://{s3_bucket}/data/missing.txt", tmp_path / "missing.txt")


def test_credentials_never_appear_in_logs_or_errors(s3_bucket, tmp_path, caplog, capfd):
    import logging

    from servers import SECRET_KEY

    caplog.set_level(logging.DEBUG)  # botocore's wire-level debug logs included
    src = make_dir(tmp_path / "src")
    artifacts.put_dir(src, f"s3://{s3_bucket}/m", tuning())
    artifacts.get_dir(f"s3://{s3_bucket}/m", tmp_path / "dst", tuning())
    with pytest.raises(UserError) as err:
        artifacts.get_dir("s3://no-such-bucket-llmpress/m", tmp_path / "x", tuning())
    out, errout = capfd.readouterr()
    seen = caplog.text + out + errout + str(err.value)
    assert "s3://" in caplog.text and len(caplog.records) > 20  # the capture did capture the transfer
    assert SECRET_KEY not in seen
    assert os.environ["AWS_ACCESS_KEY_ID"] not in "".join(r.getMessage() for r in caplog.records if r.name.startswith("llmpress"))


def test_an_abandoned_upload_of_other_content_leaves_nothing_behind(s3_bucket, tmp_path):
    """An interrupted upload whose files then change (the step reran and wrote another
    model) starts a new upload; the commit removes the abandoned data, its unfinished
    multipart uploads and the marker that named it."""
    from llmpress.components.artifacts import PENDING

    uri = f"s3://{s3_bucket}/m"
    with pytest.raises(Interrupt):
        artifacts.put_dir(make_dir(tmp_path / "v1", seed=1), uri, interrupt_after(15 * MB))
    assert keys(s3_bucket, f"m/{PENDING}") and boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    v2 = make_dir(tmp_path / "v2", seed=2)
    (v2 / "config.json").write_text('{"seed": 2, "other": true}')  # other sizes: not the abandoned upload's files
    up = artifacts.put_dir(v2, uri, tuning())
    assert up.skipped_files == 0 and up.tree == json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key=f"m/{MANIFEST}")["Body"].read())["tree"]
    assert keys(s3_bucket, f"m/{PENDING}") == []
    assert not boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    assert len({k.split("/")[2] for k in keys(s3_bucket, f"m/{DATA}/")}) == 1
    artifacts.get_dir(uri, tmp_path / "dst", tuning())
    assert digests(tmp_path / "dst") == digests(v2)


def test_the_tree_names_the_content_whatever_prefix_the_bytes_went_to(s3_bucket, tmp_path):
    src = make_dir(tmp_path / "src")
    first = artifacts.put_dir(src, f"s3://{s3_bucket}/a", tuning())
    second = artifacts.put_dir(src, f"s3://{s3_bucket}/b", tuning(concurrency=1))
    local = artifacts.put_dir(src, str(tmp_path / "store"))
    assert first.tree == second.tree == local.tree == artifacts.tree_id(artifacts._scan(src, 2))
