"""Resume: a rerun reuses the finished steps whose inputs are unchanged.

The recipe's last step reads its evaluation data from S3, where the object is missing
at the first run (a failure only the run itself can find). The rerun, after the object
is uploaded, must run only that step and the report: import, the baseline evaluation,
GPTQ and its evaluation come from the cache, and MLflow holds each stage run once.
"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import cli_env_on_s3, executed, model_steps, run_cli, tiny_recipe

# two real runs of the whole pipeline: about 3 minutes on 2 busy cores
pytestmark = pytest.mark.slow


RECIPE = tiny_recipe(stages=[
    {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16"},
    {"name": "heldout", "kind": "evaluate", "data": {"source": "s3://resume/eval/heldout.txt", "num_samples": 8, "seq_len": 64}},
])


@pytest.fixture(scope="module")
def failed_then_resumed(s3_server, tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("resume")
    env, client = cli_env_on_s3(s3_server, "resume")
    (base / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    out = base / "out"
    first = run_cli("run", str(base / "recipe.yaml"), "--out", str(out), env=env)
    from llmpress.components.data import pydoc_corpus

    client.put_object(Bucket="resume", Key="eval/heldout.txt", Body=pydoc_corpus("eval").encode())
    second = run_cli("run", str(base / "recipe.yaml"), "--out", str(out), env=env)
    return out, first, second


def test_a_step_failing_at_run_time_names_bucket_and_key(failed_then_resumed):
    _, first, _ = failed_then_resumed
    assert first.returncode == 2
    assert "llmpress: error: s3://resume/eval/heldout.txt: no such object" in first.stdout + first.stderr


def test_rerun_runs_only_the_failed_step_and_what_follows(failed_then_resumed):
    out, _, second = failed_then_resumed
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    first_run, rerun = executed(out)
    (gptq,) = model_steps(RECIPE)
    assert {"import-model", gptq} <= set(first_run)
    assert not {"import-model", gptq} & set(rerun)  # GPTQ and the import were not redone
    # evaluate-3: the baseline measured on the held-out text (its ratios need one), evaluate-4: the stage
    assert set(rerun) == {"evaluate-3", "evaluate-4", "finish"}, rerun


def test_resumed_run_keeps_one_parent_and_each_stage_run_once(failed_then_resumed):
    from mlflow.tracking import MlflowClient

    out, _, _ = failed_then_resumed
    results = json.loads((out / "results.json").read_text())
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = client.get_run(results["tracking"]["parent_run_id"])
    stages = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in stages) == ["baseline", "gptq", "heldout"]  # the failed step failed before its run
    assert parent.info.status == "FINISHED"
    everything = client.search_runs([parent.info.experiment_id])
    assert [r.info.run_id for r in everything if "mlflow.parentRunId" not in r.data.tags] == [parent.info.run_id]
    assert parent.data.tags["llmpress.recipe_hash"] == results["recipe"]["hash"]
