"""Tracking in MLflow: one parent run per pipeline run, one nested run per stage.

The tracking URI comes from the environment (``MLFLOW_TRACKING_URI``: a server on the
cluster, a sqlite file locally). Without it, tracking is off and stages still run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"


def enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def _client() -> Any:
    from mlflow.tracking import MlflowClient

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


def start_parent(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str | None:
    """Open the pipeline's parent run; returns its id (None when tracking is off)."""
    if not enabled():
        log.warning("MLFLOW_TRACKING_URI is not set: tracking is off for this run")
        return None
    client = _client()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_params(run.info.run_id, params)
    return run.info.run_id


def start_child(parent_id: str | None, name: str, params: dict[str, Any]) -> str | None:
    """Open a stage's run nested under the parent."""
    if not parent_id or not enabled():
        return None
    client = _client()
    parent = client.get_run(parent_id)
    run = client.create_run(parent.info.experiment_id, run_name=name, tags={PARENT_TAG: parent_id})
    log_params(run.info.run_id, params)
    return run.info.run_id


def log_params(run_id: str | None, params: dict[str, Any]) -> None:
    if not run_id:
        return
    from mlflow.entities import Param

    flat = flatten(params)
    items = [Param(k, v) for k, v in flat.items()]
    client = _client()
    for i in range(0, len(items), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str | None, metrics: dict[str, Any], step: int = 0) -> None:
    if not run_id:
        return
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    if items:
        _client().log_batch(run_id, metrics=items)


def log_artifact(run_id: str | None, path: str | Path) -> None:
    if run_id:
        _client().log_artifact(run_id, str(path))


def finish(run_id: str | None, status: str = "FINISHED") -> None:
    if run_id:
        _client().set_terminated(run_id, status=status)


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
        if parent and parent != exclude_parent and all(k in r.data.metrics for k in keys):
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
