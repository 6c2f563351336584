"""KFP model artifacts as pointers when storage.root is on S3: the steps move the bytes
themselves (components/kubeflow/steps.py: ModelOutput, model_input), against the test S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llmpress.components import artifacts
from llmpress.components.errors import UserError
from llmpress.components.kubeflow import steps


def context(bucket: str) -> dict[str, str]:
    return {"recipe": "ptr", "experiment": "tests", "storage": f"s3://{bucket}/root"}


def test_import_of_a_committed_s3_model_points_at_it_and_copies_nothing(s3_bucket, tiny_model_dir, tmp_path):
    source = f"s3://{s3_bucket}/models/tiny"
    tree = artifacts.put_dir(tiny_model_dir, source).tree
    kfp_dir = tmp_path / "kfp-model"
    steps.import_model(json.dumps({"source": source}), json.dumps(context(s3_bucket)), str(kfp_dir))
    assert [p.name for p in kfp_dir.iterdir()] == [steps.POINTER]
    ref = json.loads((kfp_dir / steps.POINTER).read_text())
    assert ref == {"format": "llmpress-pointer/1", "uri": source, "tree": tree, "plain": False,
                   "bytes": sum(p.stat().st_size for p in Path(tiny_model_dir).rglob("*") if p.is_file())}
    assert artifacts.committed(f"s3://{s3_bucket}/root/ptr/models/import/x") is None  # nothing was copied under storage


def test_a_local_model_is_committed_under_storage_and_read_back_through_its_pointer(s3_bucket, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRESS_SCRATCH", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    kfp_dir = tmp_path / "kfp-model"
    steps.import_model(json.dumps({"source": str(tiny_model_dir)}), json.dumps(context(s3_bucket)), str(kfp_dir))
    ref = json.loads((kfp_dir / steps.POINTER).read_text())
    assert ref["uri"].startswith(f"s3://{s3_bucket}/root/ptr/models/import/")
    assert artifacts.committed(ref["uri"])["tree"] == ref["tree"]
    assert list((tmp_path / "scratch").iterdir()) == []  # the staging copy is gone
    with steps.model_input(str(kfp_dir)) as local:
        assert Path(local).parent == tmp_path / "scratch"
        for original in Path(tiny_model_dir).iterdir():
            assert (Path(local) / original.name).read_bytes() == original.read_bytes()
    assert not Path(local).exists()  # removed when the step is done with it


def test_a_pointer_to_an_overwritten_artifact_is_refused_with_one_line(s3_bucket, tiny_model_dir, tmp_path):
    uri = f"s3://{s3_bucket}/models/moving"
    artifacts.put_dir(tiny_model_dir, uri)
    kfp_dir = tmp_path / "kfp-model"
    steps.import_model(json.dumps({"source": uri}), json.dumps(context(s3_bucket)), str(kfp_dir))
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "config.json").write_text("{}")
    artifacts.put_dir(changed, uri)  # someone overwrote the prefix after the pointer was taken
    with pytest.raises(UserError) as err, steps.model_input(str(kfp_dir)):
        pass
    (line,) = err.value.problems
    assert line.startswith(f"{uri}/llmpress-manifest.json: holds version ") and "overwritten since" in line


def test_without_s3_storage_the_step_writes_into_kfps_folder(tmp_path):
    out = steps.ModelOutput(str(tmp_path / "kfp"), {"recipe": "r", "storage": str(tmp_path / "store")}, "gptq", "k")
    assert out.path == str(tmp_path / "kfp") and out.uri is None
    assert out.commit() == str(tmp_path / "kfp")
    with steps.model_input(str(tmp_path / "kfp")) as local:
        assert local == str(tmp_path / "kfp")


def test_the_step_key_depends_on_the_input_model(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    before = steps.input_identity(str(copy))
    assert steps.input_identity(str(copy)) == before  # untouched: the same key on every run
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert steps.input_identity(str(copy)) != before  # rewritten upstream: a new key
