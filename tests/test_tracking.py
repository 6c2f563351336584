"""Tracking against a real `mlflow server` on 127.0.0.1, including an outage mid-stage."""

from __future__ import annotations

import os
import subprocess

from conftest import run_cli
from llmpress.components import tracking
from llmpress.components.tracking import spool as tracking_spool
from mlflow.tracking import MlflowClient


def children(client: MlflowClient, parent: str) -> dict[str, object]:
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"a stage run is there twice: {names}"
    return {r.info.run_name: r for r in runs}


def test_parent_run_holds_tags_flattened_params_and_nested_stage_runs(server):
    parent = tracking.start_parent("t-nesting", "recipe-a", {"stages": [{"name": "gptq", "bits": 4}]}, {"llmpress.recipe_hash": "abc"})
    child = tracking.start_child(parent, "gptq", {"bits": 4})
    for step, loss in enumerate([2.0, 1.5, 1.2]):
        tracking.log_metrics(child, {"loss": loss}, step=step)
    tracking.finish(child)
    tracking.finish(parent)
    client = MlflowClient(server.url)
    run = client.get_run(parent)
    assert run.data.params["stages.0.bits"] == "4" and run.data.tags["llmpress.recipe_hash"] == "abc"
    assert [(m.step, m.value) for m in client.get_metric_history(child, "loss")] == [(0, 2.0), (1, 1.5), (2, 1.2)]
    assert children(client, parent)["gptq"].info.status == "FINISHED"


def test_outage_mid_stage_spools_and_sync_replays_everything_exactly_once(server, tmp_path):
    spool = str(tmp_path / "spool")
    parent = tracking.start_parent("t-outage", "recipe-b", {"a": 1}, {})
    first = tracking.start_child(parent, "prune", {"sparsity": 0.5})
    tracking.log_metrics(first, {"loss": 3.0}, step=0)
    server.kill()  # the stage goes on without its server
    tracking.log_metrics(first, {"loss": 2.0}, step=1)
    (tmp_path / "report.md").write_text("# report")
    tracking.log_artifact(first, tmp_path / "report.md")
    tracking.finish(first)
    second = tracking.start_child(parent, "gptq", {"bits": 4}, experiment="t-outage")
    tracking.log_metrics(second, {"perplexity": 12.5})
    tracking.finish(second)
    tracking.finish(parent)
    assert second.startswith(tracking.PLACEHOLDER) and tracking_spool.pending(spool) == 8

    server.start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    result = run_cli("sync", spool, env=env)
    assert result.returncode == 0 and "replayed 8 records" in result.stdout, result.stderr
    again = run_cli("sync", spool, env=env)
    assert "replayed 0 records" in again.stdout

    client = MlflowClient(server.url)
    runs = children(client, parent)
    assert set(runs) == {"prune", "gptq"}
    assert [(m.step, m.value) for m in client.get_metric_history(first, "loss")] == [(0, 3.0), (1, 2.0)]
    gptq = runs["gptq"]
    assert gptq.data.metrics == {"perplexity": 12.5} and gptq.data.params == {"bits": "4"} and gptq.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(first)] == ["report.md"]
    assert client.get_run(parent).info.status == "FINISHED" and runs["prune"].info.status == "FINISHED"


def test_next_step_replays_the_spool_before_its_own_records(server, tmp_path):
    spool = str(tmp_path / "spool")
    parent = tracking.start_parent("t-next", "recipe-c", {}, {})
    server.kill()
    stage = tracking.start_child(parent, "gptq", {}, experiment="t-next")
    tracking.log_metrics(stage, {"size_bytes": 10})
    server.start()
    tracking.use_spool(spool)  # what the next step does first
    assert tracking_spool.pending(spool) == 0
    real = tracking_spool.read_ids(spool)[stage]
    tracking.finish(stage)  # by placeholder: resolved through the replay's id map
    run = MlflowClient(server.url).get_run(real)
    assert run.data.metrics == {"size_bytes": 10} and run.info.status == "FINISHED"


def test_final_model_is_registered_with_its_metrics(server):
    parent = tracking.start_parent("t-registry", "recipe-d", {}, {})
    tracking.register_model("tiny-gptq", "s3://models/tiny-gptq/abc/gptq", parent, {"perplexity": 11.5, "size_bytes": 2000})
    (version,) = MlflowClient(server.url).search_model_versions("name = 'tiny-gptq'")
    assert version.source == "s3://models/tiny-gptq/abc/gptq" and version.run_id == parent
    assert version.tags["metric.perplexity"] == "11.5" and version.tags["metric.size_bytes"] == "2000"


def test_git_revision_comes_from_gitops_or_the_recipes_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMPRESS_GIT_REVISION", raising=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\n")
    assert tracking.git_revision(recipe) is None  # not in a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "recipe.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "r"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tracking.git_revision(recipe) == head
    recipe.write_text("name: y\n")
    assert tracking.git_revision(recipe) == head + "-dirty"
    monkeypatch.setenv("LLMPRESS_GIT_REVISION", "f00d")
    assert tracking.git_revision(recipe) == "f00d"


def test_attach_adopts_a_free_stage_run_copies_a_claimed_one_and_replays_once(server, tmp_path):
    """The report step nests each stage's own run under its parent; a run that an earlier
    pipeline run holds (its step came from the cache) is copied, also when the report
    step had to spool because the server was down."""
    stage = tracking.start_run("t-attach", "wanda", {"sparsity": 0.3}, {"llmpress.recipe": "r"})
    for step, loss in enumerate([2.0, 1.0]):
        tracking.log_metrics(stage, {"train.loss": loss}, step=step)
    tracking.log_metrics(stage, {"size_bytes": 100})
    tracking.finish(stage)
    client = MlflowClient(server.url)
    assert tracking.PARENT_TAG not in client.get_run(stage).data.tags  # not nested until a report step claims it

    first = tracking.start_parent("t-attach", "r", {}, {})
    assert tracking.attach(stage, first, "wanda") == stage
    assert tracking.attach(stage, first, "wanda") == stage  # the same parent again: nothing new
    assert client.get_run(stage).data.tags[tracking.PARENT_TAG] == first

    second = tracking.start_parent("t-attach", "r", {}, {})
    copy = tracking.attach(stage, second, "wanda")
    assert copy != stage and client.get_run(stage).data.tags[tracking.PARENT_TAG] == first  # the first run keeps its stage
    run = client.get_run(copy)
    assert run.data.tags[tracking.PARENT_TAG] == second and run.data.tags["llmpress.reused_from"] == stage
    assert run.data.tags["llmpress.recipe"] == "r" and run.data.params == {"sparsity": "0.3"}
    assert run.data.metrics == {"train.loss": 1.0, "size_bytes": 100.0} and run.info.status == "FINISHED"

    third = tracking.start_parent("t-attach", "r", {}, {})
    server.kill()
    spooled = tracking.attach(stage, third, "wanda")
    assert spooled.startswith(tracking.PLACEHOLDER)
    tracking.log_metrics(spooled, {"perplexity": 7.5})
    server.start()
    spool = str(tmp_path / "spool")
    assert tracking.sync(spool) == 2
    tracking_spool.write(spool, {"op": "attach", "source": stage, "parent": third, "name": "wanda", "id": "again", "run": spooled})
    tracking.sync(spool)  # the same record replayed again (applied, not yet deleted, when a replay died)
    copies = children(client, third)
    assert set(copies) == {"wanda"} and copies["wanda"].data.metrics["perplexity"] == 7.5


def test_spool_on_s3_outlives_the_step_and_sync_replays_it(server, s3_bucket, tmp_path):
    """On the cluster the spool is an S3 prefix (``<storage.root>/<recipe>/tracking-spool``),
    so records written while MLflow is down survive the pod; `llmpress sync s3://…` replays them."""
    spool = f"s3://{s3_bucket}/runs/recipe-e/tracking-spool"
    tracking.use_spool(spool)
    server.kill()
    stage = tracking.start_run("t-s3-spool", "gptq", {"bits": 4}, {"llmpress.recipe": "recipe-e"})
    tracking.log_metrics(stage, {"perplexity": 9.5})
    (tmp_path / "plot.png").write_bytes(b"\x89PNG fake")
    tracking.log_artifact(stage, tmp_path / "plot.png")
    tracking.finish(stage)
    assert stage.startswith(tracking.PLACEHOLDER) and tracking_spool.pending(spool) == 5
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="runs/recipe-e/tracking-spool/")["Contents"]]
    assert len(keys) >= 5  # the records (and the artifact's bytes) are objects in the bucket, not files in the pod
    server.start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    result = run_cli("sync", spool, env=env)
    assert result.returncode == 0 and "replayed 5 records" in result.stdout, result.stdout + result.stderr
    assert tracking_spool.pending(spool) == 0
    real = tracking_spool.read_ids(spool)[stage]
    run = MlflowClient(server.url).get_run(real)
    assert run.data.metrics == {"perplexity": 9.5} and run.data.params == {"bits": "4"} and run.info.status == "FINISHED"
    assert [a.path for a in MlflowClient(server.url).list_artifacts(real)] == ["plot.png"]
