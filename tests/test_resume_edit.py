"""Editing one stage of a recipe reruns that stage and what follows it, nothing before;
with ``storage.root`` on S3 the models move through llmpress's store and KFP's model
artifacts hold only pointers (docs/artifacts.md).

Two real `llmpress run`s of a prune → quantize recipe into one folder, models on the
test S3 server; between them only the quantize stage's group size changes.
"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import cli_env_on_s3, executed, model_steps, run_cli, tiny_recipe

BUCKET = "edit-resume"


@pytest.fixture(scope="module")
def edited(s3_server, tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("edit")
    env, client = cli_env_on_s3(s3_server, BUCKET)
    recipe = tiny_recipe(name="edit", storage={"root": f"s3://{BUCKET}/runs"}, stages=[
        {"name": "wanda", "kind": "prune", "method": "wanda", "sparsity": 0.3},
        {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16", "group_size": 64},
    ])
    path = base / "recipe.yaml"
    out = base / "out"
    path.write_text(yaml.safe_dump(recipe))
    first = run_cli("run", str(path), "--out", str(out), env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    first_results = json.loads((out / "results.json").read_text())
    recipe["stages"][1]["group_size"] = 32
    path.write_text(yaml.safe_dump(recipe))
    second = run_cli("run", str(path), "--out", str(out), env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, first_results, json.loads((out / "results.json").read_text()), client, recipe


def test_editing_the_last_stage_reruns_only_it_its_evaluation_and_the_report(edited):
    out, _, _, _, recipe = edited
    first, second = executed(out)
    wanda, gptq_edited = model_steps(recipe)
    _, gptq = model_steps({**recipe, "stages": [recipe["stages"][0], {**recipe["stages"][1], "group_size": 64}]})
    assert set(first) == {"validate-recipe", "run-parameters", "import-model", "evaluate", wanda, "evaluate-2", gptq, "evaluate-3", "finish"}
    # validate-recipe checks the whole (edited) recipe again and run-parameters shows it: no model, a second's work
    assert set(second) == {"validate-recipe", "run-parameters", gptq_edited, "evaluate-3", "finish"}, second


def test_reused_stage_keeps_its_figures_and_the_edited_one_changes(edited):
    _, first, second, _, _ = edited
    assert first["baseline"]["metrics"] == second["baseline"]["metrics"]
    assert first["stages"][0]["metrics"] == second["stages"][0]["metrics"]  # wanda: from the cache
    assert first["stages"][0]["model_uri"] == second["stages"][0]["model_uri"]
    assert first["stages"][1]["key"] != second["stages"][1]["key"]
    assert first["stages"][1]["model_uri"] != second["stages"][1]["model_uri"]
    assert second["stages"][1]["metrics"]["size_bytes"] > first["stages"][1]["metrics"]["size_bytes"]  # smaller groups, more scales


def test_kfp_artifacts_hold_pointers_and_the_models_live_in_s3(edited):
    out, first, second, client, _ = edited
    weights = [p for p in (out / "artifacts").rglob("*") if p.suffix == ".safetensors"]
    assert weights == []  # KFP's launcher would have nothing big to copy
    pointers = sorted((out / "artifacts").rglob("llmpress-pointer.json"))
    assert len(pointers) == 4  # import and two stages, then the edited stage again
    for pointer in pointers:
        ref = json.loads(pointer.read_text())
        assert ref["uri"].startswith(f"s3://{BUCKET}/runs/edit/models/") and len(ref["tree"]) == 16 and ref["bytes"] > 0
        manifest = json.loads(client.get_object(Bucket=BUCKET, Key=ref["uri"].split("/", 3)[3] + "/llmpress-manifest.json")["Body"].read())
        assert manifest["tree"] == ref["tree"]
    for record in first["stages"] + second["stages"]:
        assert record["model_uri"] in {json.loads(p.read_text())["uri"] for p in pointers}


def test_mlflow_nests_a_reused_stage_as_a_copy_and_registers_the_s3_model(edited):
    from mlflow.tracking import MlflowClient

    out, first, second, _, _ = edited
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = {}
    for results in (first, second):
        parent = results["tracking"]["parent_run_id"]
        children = client.search_runs([client.get_run(parent).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        runs[parent] = {r.info.run_name: r for r in children}
        assert sorted(runs[parent]) == ["baseline", "gptq", "wanda"]
    old, new = runs[first["tracking"]["parent_run_id"]], runs[second["tracking"]["parent_run_id"]]
    # the first pipeline run adopted the stage's own run; the second holds a copy of it
    assert "llmpress.reused_from" not in old["wanda"].data.tags
    assert new["wanda"].data.tags["llmpress.reused_from"] == old["wanda"].info.run_id
    assert new["wanda"].data.metrics["perplexity"] == old["wanda"].data.metrics["perplexity"]
    assert new["wanda"].data.params == old["wanda"].data.params
    assert "llmpress.reused_from" not in new["gptq"].data.tags and new["gptq"].data.params["group_size"] == "32"
    assert new["gptq"].data.metrics["perplexity"] == second["stages"][1]["metrics"]["perplexity"]
    versions = sorted(client.search_model_versions("name = 'edit'"), key=lambda v: int(v.version))
    assert [v.source for v in versions] == [first["stages"][1]["model_uri"], second["stages"][1]["model_uri"]]
    assert all(v.source.startswith(f"s3://{BUCKET}/runs/edit/models/gptq/") for v in versions)
