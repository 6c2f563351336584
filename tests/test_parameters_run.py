"""Run parameters in real local runs: an override changes the result and reruns only the
stage it belongs to and what follows; a bad value stops the run in its first step."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml
from conftest import executed, model_steps, run_cli, tiny_recipe

REFUSED = "or -1 (per output channel), or 'auto' (the largest of 128, 64, 32 that divides every quantized layer) (run parameter for stages[0].group_size)"
SLOW = pytest.mark.slow  # the two real runs: about 3 minutes on 2 idle cores, 12 on busy ones


@pytest.fixture(scope="module")
def overridden(tmp_path_factory, tiny_model_dir):
    """Two runs into one folder: the recipe as written, then ``--set gptq_group_size=32``;
    then a run with a bad value."""
    base = tmp_path_factory.mktemp("override")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    path, out = base / "recipe.yaml", base / "out"
    path.write_text(yaml.safe_dump(tiny_recipe(name="override")))
    first = run_cli("run", str(path), "--out", str(out), env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    first_results = json.loads((out / "results.json").read_text())
    second = run_cli("run", str(path), "--out", str(out), "--set", "gptq_group_size=32", env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    bad = run_cli("run", str(path), "--out", str(out), "--set", "gptq.group_size=33", env=env)
    return out, first_results, json.loads((out / "results.json").read_text()), bad


@SLOW
def test_an_override_reruns_its_stage_and_what_follows_and_reuses_the_rest(overridden):
    out, _, _, _ = overridden
    first, second = executed(out)
    (gptq,) = model_steps(tiny_recipe(name="override"))
    assert set(first) == {"validate-recipe", "run-parameters", "import-model", "evaluate", gptq, "evaluate-2", "finish"}
    assert set(second) == {"validate-recipe", "run-parameters", gptq, "evaluate-2", "finish"}, second


@SLOW
def test_the_overridden_run_has_the_overridden_result(overridden):
    _, first, second, _ = overridden
    assert first["baseline"]["metrics"] == second["baseline"]["metrics"]  # from the cache
    assert second["stages"][0]["metrics"]["size_bytes"] > first["stages"][0]["metrics"]["size_bytes"]  # 32 weights per scale, not 128
    assert first["recipe"]["hash"] != second["recipe"]["hash"]


@SLOW
def test_mlflow_records_the_effective_recipe(overridden):
    from mlflow.tracking import MlflowClient

    out, first, second, _ = overridden
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(second["stages"][0]["run_id"]).data.params["group_size"] == "32"
    parent = second["tracking"]["parent_run_id"]
    recorded = yaml.safe_load(open(client.download_artifacts(parent, "recipe.yaml")).read())
    assert recorded["stages"][0]["group_size"] == 32
    assert "group_size" not in client.get_run(first["stages"][0]["run_id"]).data.params  # the recipe leaves it to the default


@SLOW
def test_a_bad_override_is_one_line_and_runs_nothing(overridden):
    out, _, _, bad = overridden
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"llmpress: error: gptq_group_size: 33 — allowed: 32, 64, 128, 256, {REFUSED}"]
    assert len(executed(out)) == 2  # no third pipeline run started


def test_a_bad_value_from_the_run_form_stops_the_run_in_its_first_step(tmp_path, capfd, tiny_model_dir, monkeypatch):
    """What a Kubeflow UI run does: the pipeline gets the value as an argument, and its
    first step, validate-recipe, refuses it before any other step starts."""
    import kfp.local
    from llmpress.pipeline import build_pipeline
    from llmpress.recipe import parse_recipe

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "artifacts"), raise_on_error=False)
    pipeline = build_pipeline(parse_recipe(tiny_recipe(name="form")))
    pipeline(gptq_group_size="33", calibration_samples=8)
    log = capfd.readouterr()
    errors = [line.strip() for line in (log.out + log.err).splitlines() if "llmpress: error:" in line]
    assert errors == [f"llmpress: error: gptq_group_size: 33 — allowed: 32, 64, 128, 256, {REFUSED}"]
    finished = re.findall(r"Task '([^']+)' finished with status (\w+)", re.sub(r"\x1b\[[0-9;]*m", "", log.out + log.err))
    assert finished == [("validate-recipe", "FAILURE"), ("run-parameters", "SUCCESS")]  # no model step started
    (page,) = (tmp_path / "artifacts").glob("*/run-parameters/parameters")
    text = page.read_text()
    assert "    llmpress: error: gptq_group_size: 33 — allowed: 32, 64, 128, 256, or -1 (per output channel), or 'auto' " in text
    assert "| `gptq_group_size` | `'33'` (changed) | `'auto'` | `stages[0].group_size` |" in text
    assert "| `calibration_samples` | `8` (changed) | `16` | `data.calibration.num_samples` |" in text
