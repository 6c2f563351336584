"""A hostile bucket, spool or pointer: every name from there is checked before it becomes
a path, every checksum is a SHA-256 that is verified, and a refusal is one line written
before any byte (components/artifacts/validation.py). Run on a local store folder, on
the suite's S3 server (SeaweedFS) and on moto's, which keeps keys SeaweedFS refuses."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmpress.components import artifacts
from llmpress.components.artifacts import MANIFEST, Tuning
from llmpress.components.errors import UserError
from llmpress.components.kubeflow import steps
from llmpress.components.tracking import spool


def tuning() -> Tuning:
    return Tuning(concurrency=2, retry_seconds=5)


def write_key(uri: str, key: str, data: bytes) -> None:
    """Write an object under the artifact as an attacker with write access would."""
    if artifacts.is_s3(uri):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{key}" if key else prefix, Body=data)
    else:
        path = Path(uri) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def committed_with(uri: str, tmp_path: Path, **entry_changes) -> dict:
    """A real committed artifact whose manifest's config.json entry is then rewritten
    (and its tree recomputed, so that only the change itself can be refused)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"w" * 100)
    artifacts.put_dir(src, uri, tuning())
    manifest = artifacts.committed(uri)
    for entry in manifest["files"]:
        if entry["path"] == "config.json":
            entry.update(entry_changes)
    manifest["tree"] = artifacts.tree_id(manifest["files"])
    write_key(uri, MANIFEST, json.dumps(manifest).encode())
    return manifest


def everything_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def refused_download(uri: str, tmp_path: Path, **kw) -> str:
    """get_dir's one-line refusal; the destination got nothing and nothing appeared beside it."""
    outside = tmp_path / "outside"
    target = outside / "inside" / "dst"
    before = everything_under(tmp_path)
    with pytest.raises(UserError) as err:
        artifacts.get_dir(uri, target, tuning(), **kw)
    (line,) = err.value.problems
    assert everything_under(target) == []
    assert [p for p in everything_under(tmp_path) if p not in before and not p.startswith("outside/inside/dst")] in (
        [], ["outside", "outside/inside"])  # at most the empty parents of the target
    return line


def test_a_manifest_path_that_climbs_out_is_refused_before_anything_is_written(store_uri, tmp_path):
    committed_with(store_uri, tmp_path, path="../../outside/escaped.txt")
    line = refused_download(store_uri, tmp_path)
    assert line.startswith(f"{store_uri}/{MANIFEST}: not a valid llmpress manifest") and "files[0].path" in line


@pytest.mark.parametrize("path", ["../escaped.txt", "/tmp/llmpress-escaped.txt", "sub/../../escaped.txt", "a//b", "./c", "a\\..\\b", "C:/x", ""])
def test_every_unsafe_manifest_path_is_refused(tmp_path, path):
    uri = str(tmp_path / "store")
    committed_with(uri, tmp_path, path=path)
    assert "files[0].path" in refused_download(uri, tmp_path)
    assert not Path("/tmp/llmpress-escaped.txt").exists()


def test_an_empty_checksum_is_refused_not_skipped(store_uri, tmp_path):
    committed_with(store_uri, tmp_path, sha256="")
    line = refused_download(store_uri, tmp_path)
    assert "files[0].sha256" in line and "verification cannot be switched off" in line


@pytest.mark.parametrize("digest", [None, "0" * 63, "Z" * 64, "A" * 64, 5])
def test_every_checksum_that_is_not_a_sha256_is_refused(tmp_path, digest):
    uri = str(tmp_path / "store")
    committed_with(uri, tmp_path, sha256=digest)
    assert "files[0].sha256" in refused_download(uri, tmp_path)


def test_a_manifest_whose_tree_is_not_its_files_hash_is_refused(store_uri, tmp_path):
    manifest = committed_with(store_uri, tmp_path)
    manifest["files"][0]["size"] += 0  # unchanged files, forged tree
    write_key(store_uri, MANIFEST, json.dumps({**manifest, "tree": "0123456789abcdef"}).encode())
    assert "is not the hash of the files it lists" in refused_download(store_uri, tmp_path)


def test_a_file_listed_twice_or_under_another_file_is_refused(store_uri, tmp_path):
    manifest = committed_with(store_uri, tmp_path)
    twice = [*manifest["files"], dict(manifest["files"][0])]
    write_key(store_uri, MANIFEST, json.dumps({**manifest, "files": twice, "tree": artifacts.tree_id(twice)}).encode())
    assert "is listed twice" in refused_download(store_uri, tmp_path)
    nested = [*manifest["files"], {**manifest["files"][0], "path": "config.json/inner"}]
    write_key(store_uri, MANIFEST, json.dumps({**manifest, "files": nested, "tree": artifacts.tree_id(nested)}).encode())
    assert "which is a file" in refused_download(store_uri, tmp_path)


def test_a_manifest_that_claims_more_bytes_than_the_disk_has_is_refused(store_uri, tmp_path):
    committed_with(store_uri, tmp_path, size=2**60)
    assert "MB to download, more than the" in refused_download(store_uri, tmp_path)


def test_an_object_shorter_than_its_manifest_says_is_refused(store_uri, tmp_path):
    manifest = committed_with(store_uri, tmp_path)
    weights = next(f for f in manifest["files"] if f["path"] == "sub/weights.bin")
    write_key(store_uri, f"{manifest['data']}sub/weights.bin", b"w" * 10)  # the listed size stays 100
    with pytest.raises(UserError) as err:
        artifacts.get_dir(store_uri, tmp_path / "dst", tuning())
    (line,) = err.value.problems
    assert "sub/weights.bin" in line and weights["size"] == 100


def test_a_huge_manifest_is_refused_without_being_read(store_uri, tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "MAX_MANIFEST_BYTES", 1000)
    write_key(store_uri, MANIFEST, b" " * 1001)
    assert "more than the 1000 allowed" in refused_download(store_uri, tmp_path)


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"format": "llmpress-artifact/1"}', b"[" * 100_000])
def test_garbage_in_place_of_a_manifest_is_one_line(store_uri, tmp_path, raw):
    write_key(store_uri, MANIFEST, raw)
    assert "not a valid llmpress manifest" in refused_download(store_uri, tmp_path)


def test_a_plain_prefix_with_a_climbing_key_is_refused_before_anything_is_written(store_uri, tmp_path):
    """moto keeps such keys and SeaweedFS refuses to store them; on a folder store,
    a link that leads out of the prefix plays the part."""
    write_key(store_uri, "config.json", b"{}")
    if store_uri.startswith("s3://"):
        try:
            write_key(store_uri, "../../escaped.txt", b"x")
        except Exception as err:  # the server itself refuses the key (SeaweedFS: InvalidRequest)
            assert "InvalidRequest" in str(err)
            return
    else:  # a folder store lists files, not links: what a link leads to is never read
        (Path(store_uri) / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "payload").write_bytes(b"x")
        artifacts.get_dir(store_uri, tmp_path / "dst", tuning(), plain_ok=True)
        assert everything_under(tmp_path / "dst") == ["config.json"]
        return
    with pytest.raises(UserError) as err:
        artifacts.get_dir(store_uri, tmp_path / "dst", tuning(), plain_ok=True)
    assert "unsafe path" in str(err.value) or "resolves outside" in str(err.value)
    assert everything_under(tmp_path / "dst") == []


def test_a_plain_prefix_skips_folder_markers(store_uri, tmp_path):
    write_key(store_uri, "config.json", b"{}")
    if store_uri.startswith("s3://"):
        write_key(store_uri, "sub/", b"")
    artifacts.get_dir(store_uri, tmp_path / "dst", tuning(), plain_ok=True)
    assert everything_under(tmp_path / "dst") == ["config.json"]


def test_a_download_target_whose_folder_is_a_link_out_is_refused(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "weights.bin").write_bytes(b"w")
    uri = str(tmp_path / "store")
    artifacts.put_dir(src, uri)
    (tmp_path / "dst").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "dst" / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UserError, match="resolves outside"):
        artifacts.get_dir(uri, tmp_path / "dst")
    assert everything_under(tmp_path / "elsewhere") == []


# --- the tracking spool ------------------------------------------------------------

def spool_record(spool_uri: str, name: str, blob: str | None = None) -> None:
    record = {"op": "log_artifact", "id": "r1", "run": "x", "name": name, "blob": blob or f"blobs/r1/{name}"}
    write_key(spool_uri, "blobs/r1/payload", b"payload")
    write_key(spool_uri, "records/00000000000000000001-r1.json", json.dumps(record).encode())


@pytest.mark.parametrize("name", ["../../escaped.txt", "/tmp/llmpress-escaped-spool.txt", "a/b", ".."])
def test_a_spooled_file_name_cannot_leave_the_replay_folder(store_uri, tmp_path, name):
    spool_record(store_uri, name)
    applied = []
    with pytest.raises(UserError) as err:
        spool.replay(store_uri, lambda record, blob: applied.append((record, blob)))
    (line,) = err.value.problems
    assert line.startswith(f"{store_uri}/records/") and applied == []
    assert not Path("/tmp/llmpress-escaped-spool.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_a_spooled_record_cannot_point_at_a_file_outside_its_blobs(store_uri, tmp_path):
    (tmp_path / "secret").write_text("not for MLflow")
    spool_record(store_uri, "secret", blob="blobs/r1/../../../secret")
    with pytest.raises(UserError, match="is not blobs/<record id>/<file name>"):
        spool.replay(store_uri, lambda record, blob: None)


@pytest.mark.parametrize("raw", [b"{", b"[]", b'{"op": 1, "id": "x"}'])
def test_a_malformed_spool_record_is_one_line(store_uri, raw):
    write_key(store_uri, "records/00000000000000000001-r1.json", raw)
    with pytest.raises(UserError, match="not an llmpress spool record"):
        spool.replay(store_uri, lambda record, blob: None)


def test_a_well_formed_spooled_file_is_replayed_with_its_bytes(store_uri):
    spool_record(store_uri, "payload")
    seen = []
    assert spool.replay(store_uri, lambda record, blob: seen.append(blob.read_bytes())) == 1
    assert seen == [b"payload"]


# --- pointers ----------------------------------------------------------------------

@pytest.mark.parametrize("pointer", [
    {"format": "llmpress-pointer/1", "uri": "/etc", "tree": "", "plain": True},
    {"format": "llmpress-pointer/1", "uri": "s3://b/m", "tree": "../x", "plain": False},
    {"format": "llmpress-pointer/1", "uri": "s3://b/m", "tree": "", "plain": "yes"},
    {"format": "other", "uri": "s3://b/m"},
    [],
])
def test_a_forged_pointer_is_one_line(tmp_path, pointer):
    (tmp_path / steps.POINTER).write_text(json.dumps(pointer))
    with pytest.raises(UserError) as err, steps.model_input(str(tmp_path)):
        pass
    (line,) = err.value.problems
    assert line.startswith(f"{tmp_path / steps.POINTER}: not an llmpress model pointer")



# --- property: any manifest is read whole or refused, and nothing lands outside -----

JSON_LEAVES = st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=12) | st.sampled_from(
    ["../x", "/abs", "a/../../b", "sub/f", "f", "", "a//b", "C:/x", "x\\..\\y", "0" * 64, "f" * 64, "llmpress-data/0123456789abcdef/"])
ENTRY = st.fixed_dictionaries({"path": JSON_LEAVES, "size": JSON_LEAVES, "sha256": JSON_LEAVES}, optional={"x": JSON_LEAVES})
MANIFESTS = st.fixed_dictionaries(
    {"format": st.sampled_from(["llmpress-artifact/1", "other"]) | JSON_LEAVES, "data": JSON_LEAVES, "files": st.lists(ENTRY, max_size=4) | JSON_LEAVES},
    optional={"tree": JSON_LEAVES, "created": JSON_LEAVES})


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(manifest=MANIFESTS, fix_tree=st.booleans(), raw=st.none() | st.binary(max_size=64))
def test_any_manifest_is_read_whole_or_refused_and_nothing_lands_outside(tmp_path, manifest, fix_tree, raw):
    case = tmp_path / uuid.uuid4().hex
    store, target = case / "store", case / "inside" / "dst"
    if fix_tree and isinstance(manifest.get("files"), list):
        try:
            manifest["tree"] = artifacts.tree_id(manifest["files"])  # so that the checks after the tree's are reached too
        except (TypeError, ValueError):
            pass
    for entry in manifest["files"] if isinstance(manifest["files"], list) else []:
        if isinstance(entry.get("path"), str) and isinstance(manifest.get("data"), str) and isinstance(entry.get("size"), int) and 0 <= entry["size"] < 100:
            key = f"{manifest['data']}{entry['path']}"
            if key.startswith("/") or ".." in key or "\\" in key:
                continue  # the test itself writes only inside the store
            try:
                write_key(str(store), key, b"x" * entry["size"])
            except (OSError, ValueError):
                pass  # a path the local disk cannot hold: the reader must still refuse it
    write_key(str(store), MANIFEST, raw if raw is not None else json.dumps(manifest).encode())
    try:
        artifacts.get_dir(str(store), target, Tuning(concurrency=1))
    except UserError as err:
        assert err.problems and all("\n" not in p for p in err.problems)
    outside = [p for p in everything_under(case) if not p.startswith(("store", "inside/dst")) and p != "inside"]
    assert outside == []
