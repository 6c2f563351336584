"""Links both ways between a Kubeflow Pipelines run and its MLflow parent run.

Kubeflow → MLflow: the report (Markdown and HTML, shown by the KFP UI on the report
step) and results.json name the parent run's page and the experiment's model view.
MLflow → Kubeflow: the parent run carries the tags KFP's own MLflow integration sets
(KEP-12862, kubeflow/pipelines ``backend/src/common/plugins/mlflow``):
``kfp.pipeline_run_id`` and ``kfp.pipeline_run_url`` (``<KFP UI>/#/runs/details/<id>``,
relative when the UI's address is unknown, as KFP does). With KFP's integration also
switched on, its own parent run has the same ``kfp.pipeline_run_id``, so one search
(``tags.kfp.pipeline_run_id = '…'``) finds both.

Addresses: ``LLMPRESS_MLFLOW_UI_URL`` (what a browser opens; the tracking URI inside
the cluster is often a service name), else an http(s) tracking URI, else what
``mlflow ui`` serves by default. ``LLMPRESS_KFP_UI_URL`` is the KFP UI
(e.g. ``https://kubeflow.example.com/pipeline``). MLflow 3's UI shows an experiment as
GenAI or model training by a setting of the browser (default GenAI); the links carry
``workflowType=machine_learning`` so that they open on runs and models.
"""

from __future__ import annotations

import os
from urllib.parse import quote

KFP_RUN_ID_TAG = "kfp.pipeline_run_id"
KFP_RUN_URL_TAG = "kfp.pipeline_run_url"
MLFLOW_UI_ENV = "LLMPRESS_MLFLOW_UI_URL"
KFP_UI_ENV = "LLMPRESS_KFP_UI_URL"
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s default address
MODEL_TRAINING = "workflowType=machine_learning"


def mlflow_ui() -> str:
    """The MLflow UI's address, without a trailing slash."""
    explicit = os.environ.get(MLFLOW_UI_ENV)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if explicit:
        return explicit.rstrip("/")
    if uri.startswith(("http://", "https://")):
        return uri.split("?", 1)[0].rstrip("/")
    return LOCAL_MLFLOW_UI


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{mlflow_ui()}/#/experiments/{quote(experiment_id)}/runs/{quote(run_id)}?{MODEL_TRAINING}"


def models_url(experiment_id: str) -> str:
    """The experiment's model view: every logged model with its metrics, side by side."""
    return f"{mlflow_ui()}/#/experiments/{quote(experiment_id)}/models?{MODEL_TRAINING}"


def experiment_url(experiment_id: str) -> str:
    """The experiment, opening on its runs."""
    return f"{mlflow_ui()}/#/experiments/{quote(experiment_id)}?{MODEL_TRAINING}"


def kfp_run_id() -> str | None:
    """The Kubeflow Pipelines run this step belongs to (``KFP_RUN_ID``, from the pod's label)."""
    return os.environ.get("KFP_RUN_ID") or None


def kfp_run_url(run_id: str) -> str:
    """The KFP UI's page of a run, as KFP's MLflow integration writes it."""
    return f"{os.environ.get(KFP_UI_ENV, '').rstrip('/')}/#/runs/details/{quote(run_id)}"


def kfp_tags() -> dict[str, str]:
    """Tags of the MLflow parent run that lead to its Kubeflow run (none outside Kubeflow)."""
    run_id = kfp_run_id()
    return {KFP_RUN_ID_TAG: run_id, KFP_RUN_URL_TAG: kfp_run_url(run_id)} if run_id else {}
