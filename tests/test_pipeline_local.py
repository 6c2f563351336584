"""`llmpress run`: the whole pipeline through kfp.local on the tiny model, with MLflow."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli, tiny_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """One real local run of a quantize recipe, shared by the tests below."""
    import yaml

    base = tmp_path_factory.mktemp("run")
    recipe = base / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    out = base / "out"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = run_cli("run", str(recipe), "--out", str(out), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_run_prints_the_results_table(finished_run):
    _, result = finished_run
    table = result.stdout[result.stdout.rindex("stage     kind") :]
    assert "baseline" in table and "gptq" in table and "quantize" in table
    assert "perplexity" in table and "size MB" in table and "wall s" in table


def test_results_json_has_baseline_and_stage_metrics(finished_run):
    out, _ = finished_run
    results = json.loads((out / "results.json").read_text())
    base = results["baseline"]["metrics"]
    (stage,) = results["stages"]
    assert (stage["name"], stage["kind"]) == ("gptq", "quantize")
    for metrics in (base, stage["metrics"]):
        assert metrics["perplexity"] > 1 and metrics["size_bytes"] > 0
    assert stage["metrics"]["size_bytes"] < 0.6 * base["size_bytes"]
    assert stage["metrics"]["size_bytes_ratio"] == pytest.approx(stage["metrics"]["size_bytes"] / base["size_bytes"])
    assert stage["metrics"]["num_parameters"] == base["num_parameters"]
    assert (out / "report.md").read_text().count("| gptq | quantize |") == 1


def test_default_group_size_auto_is_resolved_and_reported(finished_run):
    out, result = finished_run
    (stage,) = json.loads((out / "results.json").read_text())["stages"]
    assert stage["metrics"]["group_size"] == 128  # 128 divides every quantized layer of the tiny Llama (128 and 384 wide)
    assert "group_size auto -> 128" in (out / "run.log").read_text()


def test_mlflow_holds_parent_and_nested_stage_runs(finished_run):
    from mlflow.tracking import MlflowClient

    out, _ = finished_run
    results = json.loads((out / "results.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    parent_id = results["tracking"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["stages.0.scheme"] == "gptq-w4a16"
    assert "llmpress.recipe_hash" in parent.data.tags
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"baseline", "gptq"}
    assert by_name["gptq"].data.metrics["perplexity"] == pytest.approx(results["stages"][0]["metrics"]["perplexity"])
    assert by_name["gptq"].data.metrics["size_bytes"] == results["stages"][0]["metrics"]["size_bytes"]
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"results.json", "report.md"} <= artifacts


def test_quantized_artifact_reloads_with_plain_transformers(finished_run):
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = finished_run
    (model_dir,) = list((out / "artifacts").glob("*/run-stage-*/model_out"))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_report_command_reprints_the_table(finished_run):
    out, _ = finished_run
    (out / "report.md").unlink()
    result = run_cli("report", str(out))
    assert result.returncode == 0
    assert "gptq" in result.stdout and (out / "report.md").is_file()


def test_user_mistake_inside_a_step_is_one_line_and_exit_2(write_recipe, tmp_path, tiny_model_dir):
    # a calibration window longer than the whole calibration text is only found at run time
    data = tmp_path / "small.txt"
    data.write_text("just a few words of calibration text")
    recipe = tiny_recipe(data={
        "calibration": {"source": str(data), "num_samples": 4, "seq_len": 64},
        "evaluation": {"source": "builtin:pydoc-eval", "num_samples": 2, "seq_len": 32},
    })
    result = run_cli("run", str(write_recipe(recipe)), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    shown = [line for line in result.stdout.splitlines() if line.startswith("llmpress: error:")]
    assert len(shown) == 1
    assert "data.calibration.seq_len: 64 — the data holds only" in shown[0]
    assert "full log:" in result.stderr
    assert (tmp_path / "out" / "run.log").is_file()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"model": {"source": "/nonexistent/model"}}, "model.source: '/nonexistent/model' — no such model directory"),
        ({"data": {"calibration": {"source": "/nonexistent/calib.txt"}}}, "data.calibration.source: '/nonexistent/calib.txt' — file not found"),
        ({"data": {"evaluation": {"source": "/tmp/data.csv"}}}, "data.evaluation.source: '/tmp/data.csv' — a local file must end in .txt, .jsonl, .parquet"),
        ({"model": {"source": "builtin:gpt-17"}}, "model.source: 'builtin:gpt-17' — builtin models are"),
    ],
)
def test_missing_inputs_are_refused_before_any_step_runs(override, expected, write_recipe, tmp_path):
    result = run_cli("run", str(write_recipe(tiny_recipe(**override))), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"llmpress: error: {expected}")
    assert not (tmp_path / "out" / "artifacts").exists()
