"""MLflow 3's records, read back through MLflow's client from a real `mlflow server` on
127.0.0.1: logged models with linked metrics, dataset inputs, the registry version made
from a logged model, system metrics, links to Kubeflow, and the replay of each record
kind exactly once after an outage."""

from __future__ import annotations

import json
import os
import time

from conftest import run_cli
from llmpress.components import report, tracking
from llmpress.components.data import DataSpec, describe
from llmpress.components.tracking import links, logged_models, system_metrics
from llmpress.components.tracking import spool as tracking_spool
from mlflow.tracking import MlflowClient


def evaluation_data(tmp_path, text: str = "held-out text\n") -> dict:
    path = tmp_path / "eval.txt"
    path.write_text(text)
    return logged_models.dataset_input(describe(DataSpec(source=str(path), num_samples=8, seq_len=32)), "evaluation")


def test_experiment_is_made_a_model_training_experiment(server):
    tracking.start_parent("t3-kind", "r", {}, {})
    experiment = MlflowClient(server.url).get_experiment_by_name("t3-kind")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_stage_model_is_a_logged_model_with_params_its_location_and_linked_metrics(server, tmp_path):
    run = tracking.start_run("t3-model", "gptq", {"scheme": "gptq-w4a16"}, {})
    model = logged_models.log_model(run, "t3-model", "gptq", "s3://models/r/gptq/abc", "quantize", {"scheme": "gptq-w4a16", "bits": 4})
    data = evaluation_data(tmp_path)
    logged_models.log_datasets(run, [data])
    tracking.log_metrics(run, {"perplexity": 12.5, "size_bytes": 2000}, model=model, dataset=data)
    tracking.finish(run)
    client = MlflowClient(server.url)
    logged = client.get_logged_model(model)
    assert logged.name == "gptq" and logged.source_run_id == run and logged.status.value == "READY" and logged.model_type == "llmpress/quantize"
    assert logged.tags[logged_models.MODEL_URI_TAG] == "s3://models/r/gptq/abc" and logged.params == {"scheme": "gptq-w4a16", "bits": "4"}
    linked = {m.key: (m.value, m.dataset_name, m.dataset_digest, m.run_id) for m in logged.metrics}
    assert linked == {"perplexity": (12.5, "eval.txt", data["digest"], run), "size_bytes": (2000.0, "eval.txt", data["digest"], run)}
    assert client.list_artifacts(run) == []  # MLflow holds no byte of the model
    assert [o.model_id for o in client.get_run(run).outputs.model_outputs] == [model]


def test_the_same_artifact_is_one_logged_model(server):
    first = tracking.start_run("t3-same", "wanda", {}, {})
    second = tracking.start_run("t3-same", "wanda", {}, {})  # a later pipeline run that reused the cached step
    model = logged_models.log_model(first, "t3-same", "wanda", "/runs/r/artifacts/1/prune/model_out", "prune", {})
    assert logged_models.log_model(second, "t3-same", "wanda", "/runs/r/artifacts/1/prune/model_out", "prune", {}) == model
    other = logged_models.log_model(second, "t3-same", "wanda", "/runs/r/artifacts/2/prune/model_out", "prune", {})
    assert other != model


def test_datasets_are_inputs_of_the_runs_that_used_them_with_name_digest_source_and_context(server, tmp_path):
    run = tracking.start_run("t3-data", "gptq", {}, {})
    calibration = logged_models.dataset_input(describe(DataSpec(source="builtin:pydoc-train", num_samples=16, seq_len=64)), "calibration")
    evaluation = evaluation_data(tmp_path)
    logged_models.log_datasets(run, [calibration, evaluation])
    logged_models.log_datasets(run, [evaluation])  # again: still one input
    inputs = MlflowClient(server.url).get_run(run).inputs.dataset_inputs
    found = {i.dataset.name: (i.dataset.digest, i.dataset.source_type, json.loads(i.dataset.source), {t.key: t.value for t in i.tags}) for i in inputs}
    assert found == {
        "pydoc-train": (calibration["digest"], "code", {"tags": {"llmpress.source": "builtin:pydoc-train"}}, {"mlflow.data.context": "calibration"}),
        "eval.txt": (evaluation["digest"], "local", {"uri": str(tmp_path / "eval.txt")}, {"mlflow.data.context": "evaluation"}),
    }


def test_a_dataset_digest_changes_with_its_content_and_its_sampling(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("one")
    first = describe(DataSpec(source=str(path)))["digest"]
    assert describe(DataSpec(source=str(path)))["digest"] == first
    assert describe(DataSpec(source=str(path), num_samples=7))["digest"] != first
    path.write_text("two")
    assert describe(DataSpec(source=str(path)))["digest"] != first


def test_the_registry_version_is_made_from_the_final_logged_model(server):
    parent = tracking.start_parent("t3-registry", "r3", {}, {})
    stage = tracking.start_run("t3-registry", "gptq", {}, {})
    model = logged_models.log_model(stage, "t3-registry", "gptq", "s3://models/r3/gptq/k", "quantize", {})
    tracking.register_model("t3-final", "s3://models/r3/gptq/k", parent, {"perplexity": 11.5}, model=model)
    client = MlflowClient(server.url)
    (version,) = client.search_model_versions("name = 't3-final'")
    assert version.source == "s3://models/r3/gptq/k" and version.run_id == parent  # a deployment downloads the weights from there
    assert version.tags["llmpress.model_id"] == model and version.tags["metric.perplexity"] == "11.5"
    assert json.loads(client.get_logged_model(model).tags[logged_models.MODEL_VERSIONS_TAG]) == [{"name": "t3-final", "version": 1}]


def test_system_metrics_are_sampled_into_the_stage_run(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.3")
    run = tracking.start_run("t3-system", "gptq", {}, {})
    with system_metrics.recording(run):
        deadline = time.monotonic() + 2.0  # CPU work for several sampling intervals, however fast the machine
        while time.monotonic() < deadline:
            sum(i * i for i in range(100_000))
    tracking.finish(run)
    client = MlflowClient(server.url)
    cpu = client.get_metric_history(run, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and [m.step for m in cpu] == list(range(len(cpu)))
    assert client.get_run(run).data.metrics["system/system_memory_usage_megabytes"] > 0


def test_every_new_record_kind_is_replayed_exactly_once_after_an_outage(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    spool = str(tmp_path / "spool")
    parent = tracking.start_parent("t3-outage", "r4", {}, {})
    server.kill()
    stage = tracking.start_run("t3-outage", "gptq", {}, {})
    with system_metrics.recording(stage):
        sum(i * i for i in range(2_000_000))
    model = logged_models.log_model(stage, "t3-outage", "gptq", "s3://models/r4/gptq/k", "quantize", {"bits": 4})
    data = evaluation_data(tmp_path)
    logged_models.log_datasets(stage, [data])
    tracking.log_metrics(stage, {"perplexity": 9.5}, model=model, dataset=data)
    tracking.finish(stage)
    logged_models.log_output(parent, model)
    tracking.register_model("t3-outage-final", "s3://models/r4/gptq/k", parent, {"perplexity": 9.5}, model=model)
    assert model.startswith(tracking.PLACEHOLDER) and stage.startswith(tracking.PLACEHOLDER)
    kinds = {json.loads(tracking_spool.artifacts.open_store(spool).read_bytes(k))["op"] for k, _ in tracking_spool.artifacts.open_store(spool).list("records/")}
    assert {"create_model", "log_inputs", "log_outputs", "register"} <= kinds

    server.start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    result = run_cli("sync", spool, env=env)
    assert result.returncode == 0 and "replayed" in result.stdout, result.stdout + result.stderr
    ids = tracking_spool.read_ids(spool)
    # the same records again, as when a replay died after applying them and before deleting them
    for op, extra in (("create_model", {"source": stage, "experiment": "t3-outage", "name": "gptq", "model_uri": "s3://models/r4/gptq/k",
                                         "kind": "llmpress/quantize", "params": {}, "tags": {}, "run": model}),
                      ("log_inputs", {"run": stage, "datasets": [data]}), ("log_outputs", {"run": parent, "model": model}),
                      ("log_batch", {"run": stage, "metrics": [], "model": model})):
        tracking_spool.write(spool, {"op": op, "id": f"again-{op}", **extra})
    assert run_cli("sync", spool, env=env).returncode == 0

    client = MlflowClient(server.url)
    real_stage, real_model = ids[stage], ids[model]
    (logged,) = client.search_logged_models([client.get_experiment_by_name("t3-outage").experiment_id])
    assert logged.model_id == real_model and logged.source_run_id == real_stage and logged.params == {"bits": "4"}
    assert [(m.key, m.value, m.dataset_digest) for m in logged.metrics] == [("perplexity", 9.5, data["digest"])]
    run = client.get_run(real_stage)
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [data["digest"]]
    assert [o.model_id for o in client.get_run(parent).outputs.model_outputs] == [real_model]
    assert len(client.get_metric_history(real_stage, "system/cpu_utilization_percentage")) >= 1
    (version,) = client.search_model_versions("name = 't3-outage-final'")
    assert version.source == "s3://models/r4/gptq/k" and version.tags["llmpress.model_id"] == real_model


def test_the_parent_run_links_to_its_kubeflow_run_as_kfp_does(server, monkeypatch):
    monkeypatch.setenv("KFP_RUN_ID", "5f0c-run")
    monkeypatch.setenv(links.KFP_UI_ENV, "https://kubeflow.example.com/pipeline/")
    parent = tracking.start_parent("t3-links", "r5", {}, links.kfp_tags())
    tags = MlflowClient(server.url).get_run(parent).data.tags
    assert tags["kfp.pipeline_run_id"] == "5f0c-run"
    assert tags["kfp.pipeline_run_url"] == "https://kubeflow.example.com/pipeline/#/runs/details/5f0c-run"


def test_the_report_links_to_the_mlflow_run_its_models_and_the_kubeflow_run(monkeypatch):
    monkeypatch.setenv(links.MLFLOW_UI_ENV, "https://mlflow.example.com")
    monkeypatch.delenv(links.KFP_UI_ENV, raising=False)
    results = {"recipe": {"name": "r6"}, "baseline": {"metrics": {"perplexity": 10.0, "size_bytes": 100}}, "stages": [],
               "tracking": {"mlflow_run_url": links.run_url("7", "abc"), "mlflow_models_url": links.models_url("7"), "kfp_run_url": links.kfp_run_url("k1")}}
    text = report.markdown(results)
    assert "[MLflow parent run](https://mlflow.example.com/#/experiments/7/runs/abc?workflowType=machine_learning)" in text
    assert "[MLflow models (compare)](https://mlflow.example.com/#/experiments/7/models?workflowType=machine_learning)" in text
    assert "[Kubeflow run](/#/runs/details/k1)" in text


def test_a_malformed_logged_model_record_in_the_spool_is_one_line_not_a_replay(server, tmp_path):
    spool = str(tmp_path / "spool")
    tracking_spool.write(spool, {"op": "create_model", "id": "f" * 32, "run": tracking.PLACEHOLDER + "0" * 32, "source": "r", "experiment": "t3-bad",
                                 "name": "x' or name != '", "model_uri": "s3://b/m", "kind": "llmpress/quantize", "params": {}, "tags": {}})
    result = run_cli("sync", spool, env={**os.environ, "MLFLOW_TRACKING_URI": server.url})
    assert result.returncode == 2 and "(create_model): name malformed" in result.stderr + result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and tracking_spool.pending(spool) == 1
