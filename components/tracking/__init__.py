"""Tracking in MLflow: one parent run per pipeline run, one nested run per stage.

The tracking URI comes from the environment (``MLFLOW_TRACKING_URI``: a server on the
cluster, a sqlite file locally). Without it, tracking is off and stages still run.

A tracking server that cannot be reached never fails a stage: from the first failed
call on, the step writes each record (run created, params, metrics with their step and
time, artifacts, status, model registration) to a spool (``tracking_spool.py``: a local
folder or an S3 prefix), in order. The next step that reaches the server, or
``llmpress sync SPOOL``, replays it. Runs created while offline get a placeholder id
(``spool-…``) that the replay maps to the real one.

MLflow 3's records around the runs (logged models, dataset inputs, metrics linked to a
model and a dataset, system metrics) live beside this module: ``logged_models.py``,
``system_metrics.py``, ``links.py``; they travel through the same spool.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from llmpress.components.tracking import spool as tracking_spool
from llmpress.components.tracking.redaction import redacted

log = logging.getLogger("llmpress.tracking")

PARENT_TAG = "mlflow.parentRunId"
# what MLflow 3's UI reads to treat an experiment as model training (runs, models), not GenAI
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
SPOOL_ENV = "LLMPRESS_TRACKING_SPOOL"
PLACEHOLDER = "spool-"
# MLflow refusing the record itself: replaying it would be refused again
REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}

_state: dict[str, Any] = {"offline": False, "spool": None, "ids": None}


def enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    # MLflow's defaults (7 retries, 120 s timeout) would hold a stage for many minutes
    # per call when the server is down; the spool makes waiting pointless
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run at <URI>" would print credentials in it
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists as ``a.b.0.c`` keys, the way MLflow params are read."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: str(value)[:6000]} if prefix else {}
    out: dict[str, str] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def git_revision(path: str | Path | None = None) -> str | None:
    """The revision the recipe comes from: ``LLMPRESS_GIT_REVISION`` (set by GitOps on
    the cluster), else the commit of the git checkout holding ``path`` (+``-dirty``)."""
    if os.environ.get("LLMPRESS_GIT_REVISION"):
        return os.environ["LLMPRESS_GIT_REVISION"]
    if path is None:
        return None
    folder = Path(path).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", str(Path(path).resolve())], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def use_spool(spool: str | None) -> None:
    """Where this process spools records; replays what is already there if it can."""
    _state.update(spool=spool, ids=None, offline=False)  # each step tries the server afresh
    if spool and enabled() and tracking_spool.pending(spool):
        try:
            sync(spool)
        except Exception as err:  # still offline: this step spools after the older records
            _go_offline(err)


def spool_location() -> str:
    return _state["spool"] or os.environ.get(SPOOL_ENV) or str(Path("llmpress-tracking-spool").resolve())


def _ids() -> dict[str, str]:
    if _state["ids"] is None:
        _state["ids"] = tracking_spool.read_ids(spool_location())
    return _state["ids"]


def _resolve(run_id: str | None) -> str | None:
    return _ids().get(run_id, run_id) if run_id and run_id.startswith(PLACEHOLDER) else run_id


def _go_offline(err: BaseException) -> None:
    if not _state["offline"]:
        log.warning("MLflow at %s cannot be reached (%s); records go to %s and `llmpress sync %s` replays them",
                    redacted(os.environ.get("MLFLOW_TRACKING_URI", "")), type(err).__name__, spool_location(), spool_location())
    _state["offline"] = True


def _submit(record: dict[str, Any], local_file: Path | None = None) -> str | None:
    """Apply a record now, or spool it; returns what applying returned (a run id for
    create_run: a placeholder when spooled)."""
    if not enabled():
        return None
    record = {**record, "id": uuid.uuid4().hex}
    refs = ("run", "parent", "source", "model")
    unresolved = any(str(_resolve(record.get(k))).startswith(PLACEHOLDER) for k in refs if record.get(k))
    if not _state["offline"] and not unresolved:
        try:
            return apply(_client(), {**record, **{k: _resolve(record.get(k)) for k in refs if k in record}}, local_file)
        except Exception as err:
            if getattr(err, "error_code", None) in REJECTED:
                log.warning("MLflow refused %s: %s", record["op"], str(err)[:300])
                return None
            _go_offline(err)
    if record["op"] in tracking_spool.CREATES:
        record["run"] = PLACEHOLDER + record["id"]
    tracking_spool.write(spool_location(), record, local_file)
    return record.get("run")


def apply(client: Any, record: dict[str, Any], local_file: Path | None = None) -> Any:
    """Carry out one record against MLflow (used live and by the replay)."""
    from mlflow.entities import Metric, Param

    op, run = record["op"], record.get("run")
    if op == "attach":
        return _attach(client, record)
    if op in MODEL_OPS:
        from llmpress.components.tracking import logged_models

        return logged_models.apply(client, record)
    if op == "create_run":
        experiment_id = experiment_for(client, record["experiment"])
        tags = {**record["tags"], **({PARENT_TAG: record["parent"]} if record.get("parent") else {})}
        if run and run.startswith(PLACEHOLDER):  # a replay: the same record never makes two runs
            tags["llmpress.spool_id"] = run
            made = _made_by(client, experiment_id, run)
            if made:
                return made
        return client.create_run(experiment_id, run_name=record["name"], tags=tags, start_time=record.get("time")).info.run_id
    if op == "log_batch":
        dataset = record.get("dataset") or {}
        _log_batch(client, run, [Param(k, v) for k, v in record.get("params", {}).items()],
                   [Metric(k, v, ts, step, model_id=record.get("model"), dataset_name=dataset.get("name"), dataset_digest=dataset.get("digest"))
                    for k, v, ts, step in record.get("metrics", [])])
    elif op == "log_artifact":
        client.log_artifact(run, str(local_file))
    elif op == "terminate":
        client.set_terminated(run, status=record["status"], end_time=record.get("time"))
    elif op == "register":
        _register(client, record)
    return None


MODEL_OPS = ("create_model", "log_inputs", "log_outputs")  # logged_models.py carries them out


def experiment_for(client: Any, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment when missing
    (and marked as one when an earlier version of llmpress made it without the tag)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if key not in found.tags:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def _attach(client: Any, record: dict[str, Any]) -> str:
    """Nest a stage's run under the pipeline's parent run. A run no pipeline run has
    claimed yet is adopted (its parent tag set); a run an earlier pipeline run already
    holds (its step came from the cache) is copied: a new nested run with its params,
    latest metrics, status and tags, tagged ``llmpress.reused_from``."""
    from mlflow.entities import Metric, Param

    source, parent = client.get_run(record["source"]), client.get_run(record["parent"])
    holder = source.data.tags.get(PARENT_TAG)
    if holder in (None, parent.info.run_id) and source.info.experiment_id == parent.info.experiment_id:
        client.set_tag(source.info.run_id, PARENT_TAG, parent.info.run_id)
        return source.info.run_id
    run = record.get("run")
    if run and run.startswith(PLACEHOLDER):  # a replay: the same record never makes two copies
        made = _made_by(client, parent.info.experiment_id, run)
        if made:
            return made
    tags = {k: v for k, v in source.data.tags.items() if not k.startswith("mlflow.")}
    tags.update({PARENT_TAG: parent.info.run_id, "llmpress.reused_from": source.info.run_id, **({"llmpress.spool_id": run} if run else {})})
    copy = client.create_run(parent.info.experiment_id, run_name=record["name"], tags=tags, start_time=source.info.start_time).info.run_id
    _log_batch(client, copy, [Param(k, v) for k, v in source.data.params.items()],
               [Metric(k, v, source.info.end_time or _now(), 0) for k, v in source.data.metrics.items()])
    client.set_terminated(copy, status=source.info.status if source.info.status != "RUNNING" else "FINISHED", end_time=source.info.end_time)
    return copy


def _made_by(client: Any, experiment_id: str, placeholder: str) -> str | None:
    """The run an earlier replay of the same spooled record created, if any."""
    if not re.fullmatch(rf"{PLACEHOLDER}[0-9a-f]{{32}}", placeholder):
        raise ValueError(f"spool placeholder {placeholder!r} is not {PLACEHOLDER}<32 hex digits>")
    same = client.search_runs([experiment_id], filter_string=f"tags.`llmpress.spool_id` = '{placeholder}'")
    return same[0].info.run_id if same else None


def _log_batch(client: Any, run: str, params: list[Any], metrics: list[Any]) -> None:
    for i in range(0, max(len(params), len(metrics)), 100):  # MLflow's batch limit for params
        client.log_batch(run, params=params[i : i + 100], metrics=metrics[i : i + 100])


def _register(client: Any, record: dict[str, Any]) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(record["name"], description="llmpress: the final model of a recipe's pipeline")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    spool_id = record["id"]
    if not re.fullmatch(r"[0-9a-f]{32}", spool_id):  # it goes into a filter string; a spool is read from outside
        raise ValueError(f"spool record id {spool_id!r} is not 32 hex digits")
    # looked up by our own id only: a name is never put into a filter ("it's" would break it)
    if any(v.name == record["name"] for v in client.search_model_versions(f"tags.`llmpress.spool_id` = '{spool_id}'")):
        return  # replayed twice: one version only
    model = record.get("model")
    if model is None:
        client.create_model_version(record["name"], record["source"], run_id=record["run"], tags={**record["tags"], "llmpress.spool_id": spool_id})
        return
    from llmpress.components.tracking import logged_models

    logged_models.register_version(client, record["name"], model, record["run"], record["source"], {**record["tags"], "llmpress.spool_id": spool_id})


def sync(spool: str | None = None) -> int:
    """Replay the spool against MLflow; returns how many records were applied."""
    spool = spool or spool_location()
    client = _client()
    applied = tracking_spool.replay(spool, lambda record, blob: apply(client, record, blob))
    _state["ids"], _state["offline"] = None, False
    return applied


def start_parent(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str | None:
    """Open the pipeline's parent run; returns its id (None when tracking is off)."""
    if not enabled():
        log.warning("MLFLOW_TRACKING_URI is not set: tracking is off for this run")
        return None
    return start_run(experiment, run_name, params, tags)


def start_child(parent_id: str | None, name: str, params: dict[str, Any], experiment: str | None = None, tags: dict[str, str] | None = None) -> str | None:
    """Open a stage's run nested under the parent (in the parent's experiment)."""
    if not parent_id or not enabled():
        return None
    if experiment is None and not parent_id.startswith(PLACEHOLDER) and not _state["offline"]:
        try:
            experiment = _client().get_experiment(_client().get_run(parent_id).info.experiment_id).name
        except Exception as err:
            _go_offline(err)
    return start_run(experiment or "llmpress", name, params, tags or {}, parent=parent_id)


def start_run(experiment: str, name: str, params: dict[str, Any], tags: dict[str, str], parent: str | None = None) -> str | None:
    """Open a run (nested under ``parent`` when given). A stage opens its own without a
    parent: the step cannot know the pipeline run it belongs to without making its cache
    key differ on every run; ``attach`` nests it later."""
    if not enabled():
        return None
    run_id = _submit({"op": "create_run", "experiment": experiment, "name": name, "tags": tags, **({"parent": parent} if parent else {}), "time": _now()})
    log_params(run_id, params)
    return run_id


def attach(run_id: str | None, parent_id: str | None, name: str) -> str | None:
    """Nest a stage's run (from ``start_run``) under ``parent_id``; returns the nested
    run's id: the same run, or a copy when an earlier pipeline run holds it already."""
    if not run_id or not parent_id:
        return None
    return _submit({"op": "attach", "source": run_id, "parent": parent_id, "name": name})


def log_params(run_id: str | None, params: dict[str, Any]) -> None:
    if run_id:
        _submit({"op": "log_batch", "run": run_id, "params": flatten(params)})


def log_metrics(run_id: str | None, metrics: dict[str, Any], step: int = 0, model: str | None = None, dataset: dict[str, Any] | None = None) -> None:
    """Numeric values only; ``step`` orders a training curve. ``model`` (a logged model's
    id) and ``dataset`` (``{"name", "digest"}`` of a dataset input of the run) link the
    values to what was measured on what: MLflow 3 shows them on the model."""
    items = [[k, float(v), _now(), step] for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    if run_id and items:
        links = {**({"model": model} if model else {}), **({"dataset": {"name": dataset["name"], "digest": dataset["digest"]}} if dataset else {})}
        _submit({"op": "log_batch", "run": run_id, "metrics": items, **links})


def log_artifact(run_id: str | None, path: str | Path) -> None:
    if run_id:
        _submit({"op": "log_artifact", "run": run_id, "name": Path(path).name}, Path(path))


def finish(run_id: str | None, status: str = "FINISHED") -> None:
    if run_id:
        _submit({"op": "terminate", "run": run_id, "status": status, "time": _now()})


def register_model(name: str, source: str, run_id: str | None, metrics: dict[str, Any], model: str | None = None) -> None:
    """A new version of ``name`` in the Model Registry, linked to the parent run, its
    metrics as tags, pointing at ``source`` (the model's artifact). With ``model`` (a
    logged model's id) the version is made from that logged model: MLflow's
    ``model_id``, its ``llmpress.model_id`` tag, and the logged model lists the version."""
    if run_id:
        tags = {f"metric.{k}": str(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        _submit({"op": "register", "run": run_id, "name": name, "source": source, "tags": tags, **({"model": model} if model else {})})


def experiment_id(name: str) -> str | None:
    """The id of experiment ``name``; None when tracking is off or MLflow is out of reach."""
    if not enabled() or _state["offline"]:
        return None
    try:
        found = _client().get_experiment_by_name(name)
    except Exception as err:
        _go_offline(err)
        return None
    return found.experiment_id if found else None


def _now() -> int:
    return int(time.time() * 1000)



def experiment_points(experiment: str, exclude_parent: str | None = None, keys: tuple[str, ...] = ("perplexity", "size_bytes")) -> list[dict[str, Any]]:
    """The figures of every stage run (nested) of the experiment's pipeline runs other
    than ``exclude_parent``: the history the report's quality-against-size plot shows."""
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=2000)
    names = {r.info.run_id: r.info.run_name for r in runs if PARENT_TAG not in r.data.tags}
    points = []
    for r in runs:
        parent = r.data.tags.get(PARENT_TAG)
        reused = "llmpress.reused_from" in r.data.tags  # a copy of a run already counted under the run that made it
        if parent and parent != exclude_parent and not reused and all(k in r.data.metrics for k in keys):
            points.append({"parent_run_id": parent, "run": names.get(parent, parent[:8]), "stage": r.info.run_name, "metrics": dict(r.data.metrics)})
    return points


def run_results(run_id: str) -> dict[str, Any]:
    """The results.json logged on a pipeline's parent run (a stage's run id leads to it)."""
    import json
    import tempfile

    client = _client()
    run = client.get_run(run_id)
    parent = run.data.tags.get(PARENT_TAG, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(parent, "results.json", tmp)).read_text())
