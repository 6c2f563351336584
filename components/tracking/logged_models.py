"""MLflow 3's records around the runs: logged models, dataset inputs, model outputs.

Every model a pipeline makes, and the baseline, is a *logged model* of the experiment:
its name (the stage's), the stage's settings as its params, its evaluation figures as
metrics linked to it and to the evaluation dataset, so MLflow's model view compares
models without opening runs. Its weights stay where llmpress's artifact store put them
(``llmpress.model_uri``: an ``s3://`` URI or a local folder); MLflow holds no byte of
them. One artifact is one logged model: a pipeline run that reuses a cached step finds
the model by its URI instead of making a second one, and so does a replay.

Datasets (calibration, evaluation, distillation) are dataset inputs of the runs that
used them: name, digest and source, with ``mlflow.data.context`` saying what for.
Every record goes through the tracking spool like the runs' own.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

from llmpress.components import tracking
from llmpress.components.errors import UserError

MODEL_URI_TAG = "llmpress.model_uri"
CONTEXT_TAG = "mlflow.data.context"  # MLflow's tag on a dataset input: what the run used it for
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: the registry versions made from it


def log_model(run_id: str | None, experiment: str, name: str, model_uri: str | None, kind: str, params: dict[str, Any],
              tags: dict[str, str] | None = None) -> str | None:
    """The logged model of the artifact at ``model_uri``, produced by run ``run_id``
    (created, or found when it exists already); returns its id, a placeholder while
    MLflow cannot be reached, None when tracking is off."""
    if not run_id or not model_uri:
        return None
    record = {"op": "create_model", "source": run_id, "experiment": experiment, "name": name, "model_uri": model_uri,
              "kind": f"llmpress/{kind}", "params": tracking.flatten(params), "tags": tags or {}}
    return tracking._submit(record)


def log_datasets(run_id: str | None, datasets: list[dict[str, Any]]) -> None:
    """Dataset inputs of a run, each a ``dataset_input()``."""
    if run_id and datasets:
        tracking._submit({"op": "log_inputs", "run": run_id, "datasets": datasets})


def log_output(run_id: str | None, model: str | None) -> None:
    """Record that run ``run_id`` produced logged model ``model`` (the runs table's Models column)."""
    if run_id and model:
        tracking._submit({"op": "log_outputs", "run": run_id, "model": model})


def dataset_input(description: dict[str, Any], context: str) -> dict[str, Any]:
    """MLflow's dataset record for a ``data.describe()`` result used as ``context``
    (calibration, evaluation, distillation). A file's source is typed as MLflow types it
    (``s3``, ``local``); a builtin corpus or a hub dataset is a ``code`` source."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uri = description["source"]
    if uri.startswith(("builtin:", "hf:")):  # no file behind it: data defined by name
        source: Any = CodeDatasetSource(tags={"llmpress.source": uri})
    else:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": two registrations of the same local source
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)  # s3:// and local paths: MLflow's artifact sources
    entity = MetaDataset(source, name=description["name"], digest=description["digest"])._to_mlflow_entity()
    return {"name": entity.name, "digest": entity.digest, "source_type": entity.source_type, "source": entity.source,
            "profile": json.dumps(description.get("profile") or {}, sort_keys=True), "context": context}


SHAPES = {  # what each record must hold: a spool may sit on a bucket others can write
    "create_model": {"source": str, "experiment": str, "name": str, "model_uri": str, "kind": str, "params": dict, "tags": dict},
    "log_inputs": {"run": str, "datasets": list},
    "log_outputs": {"run": str, "model": str},
}
DATASET_FIELDS = ("name", "digest", "source_type", "source", "context")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # stage names and "baseline"; it goes into a filter string


def _check(record: dict[str, Any]) -> None:
    wrong = [k for k, kind in SHAPES.get(record["op"], {}).items() if not isinstance(record.get(k), kind)]
    if record["op"] == "create_model" and not wrong and not NAME.fullmatch(record["name"]):
        wrong = ["name"]
    if record["op"] == "log_inputs" and not wrong:
        wrong = ["datasets"] if not all(isinstance(d, dict) and all(isinstance(d.get(f), str) for f in DATASET_FIELDS) for d in record["datasets"]) else []
    if wrong:
        raise UserError(f"spool record {record.get('id')!r} ({record['op']}): {', '.join(wrong)} malformed; remove it to replay the rest")


def apply(client: Any, record: dict[str, Any]) -> Any:
    """Carry out one of this module's records against MLflow (live and in a replay)."""
    _check(record)
    if record["op"] == "create_model":
        return _create_model(client, record)
    if record["op"] == "log_inputs":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], None, d.get("profile")),
                               tags=[InputTag(CONTEXT_TAG, d["context"])]) for d in record["datasets"]]
        client.log_inputs(record["run"], datasets=inputs)  # MLflow keeps one input per (name, digest) and run
        return None
    if record["op"] == "log_outputs":
        from mlflow.entities import LoggedModelOutput

        outputs = client.get_run(record["run"]).outputs
        if not any(o.model_id == record["model"] for o in (outputs.model_outputs if outputs else [])):
            client.log_outputs(record["run"], [LoggedModelOutput(record["model"], 0)])
        return None
    raise ValueError(f"not a logged-model record: {record['op']}")


def _create_model(client: Any, record: dict[str, Any]) -> str:
    experiment_id = tracking.experiment_for(client, record["experiment"])
    model = _model_of(client, experiment_id, record["name"], record["model_uri"])
    if model is None:
        tags = {**record["tags"], MODEL_URI_TAG: record["model_uri"], "llmpress.kind": record["kind"]}
        model = client.create_logged_model(experiment_id, name=record["name"], source_run_id=record["source"], tags=tags,
                                           params=record["params"], model_type=record["kind"])
    if str(model.status) != "READY" and getattr(model.status, "value", None) != "READY":
        client.finalize_logged_model(model.model_id, "READY")  # nothing to upload: the weights are where model_uri says
    apply(client, {"op": "log_outputs", "run": model.source_run_id or record["source"], "model": model.model_id})
    return model.model_id


def _model_of(client: Any, experiment_id: str, name: str, model_uri: str) -> Any:
    """The logged model already made for this artifact, if any (``name`` was checked
    against NAME: safe inside MLflow's filter)."""
    token = None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=f"name = '{name}'", max_results=100, page_token=token)
        for model in page:
            if model.tags.get(MODEL_URI_TAG) == model_uri:
                return model
        token = page.token
        if not token:
            return None


def register_version(client: Any, name: str, model: str, run_id: str, source: str, tags: dict[str, str]) -> None:
    """A version of registered model ``name`` made from logged model ``model`` (MLflow's
    ``model_id``), its source the weights' own location (so that a deployment downloads
    them, not the logged model's empty MLflow folder), listed on the logged model."""
    version = client.create_model_version(name, source, run_id=run_id, tags={**tags, "llmpress.model_id": model}, model_id=model)
    logged = client.get_logged_model(model)
    listed = json.loads(logged.tags.get(MODEL_VERSIONS_TAG) or "[]")
    entry = {"name": name, "version": int(version.version)}  # the shape MLflow's server writes
    if (name, str(version.version)) not in [(v.get("name"), str(v.get("version"))) for v in listed]:  # a server sets it itself; sqlite does not
        client.set_logged_model_tags(model, {MODEL_VERSIONS_TAG: json.dumps(listed + [entry])})
