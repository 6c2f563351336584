"""What the report step records in MLflow around the runs: the baseline's logged model,
each evaluation linked to the model it measured and the dataset it used, the datasets
and the final model on the parent run, and the links between the MLflow and Kubeflow
runs (``tracking/logged_models.py`` and ``tracking/links.py`` say how)."""

from __future__ import annotations

from typing import Any

from llmpress.components import tracking
from llmpress.components.data import DataSpec, describe
from llmpress.components.tracking import links, logged_models


def stage_dataset(stage: dict[str, Any], calibration: DataSpec, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The dataset input a stage used: distill's training text, or the calibration data of
    a stage that calibrated (bitsandbytes and magnitude pruning read none)."""
    if stage["kind"] == "distill":
        spec, context = (DataSpec.model_validate(stage["data"]) if stage.get("data") else calibration), "distillation"
    elif metrics.get("calibration_samples"):
        spec, context = (DataSpec.model_validate(stage["calibration"]) if stage.get("calibration") else calibration), "calibration"
    else:
        return None
    if spec.source.startswith("s3://"):  # its bytes were read into the stage; hashing them means one more download
        from llmpress.components.kubeflow.steps import local_data  # steps imports this module

        return logged_models.dataset_input(describe(spec, local_data(spec, "data").source), context)
    return logged_models.dataset_input(describe(spec), context)


def model_params(stage: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings that describe its model (where it ran is not one of them)."""
    return {k: v for k, v in stage.items() if k not in ("resources", "_context", "teacher")}


def evaluation_datasets(evals: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation datasets of the evaluations' records."""
    return [e["dataset"] for e in [evals["baseline"], *evals["evaluations"]] if e and e.get("dataset")]


def baseline_model(run_id: str | None, experiment: str, evaluation: dict[str, Any], recipe: dict[str, Any]) -> str | None:
    """The uncompressed model as a logged model, made by the baseline's run."""
    return logged_models.log_model(run_id, experiment, "baseline", evaluation.get("model_uri"), "baseline", {"model": recipe["model"]},
                                   {"llmpress.recipe": recipe["name"]})


def log_evaluation(run_id: str | None, evaluation: dict[str, Any] | None, model_id: str | None) -> None:
    """An evaluation's figures on ``run_id``, linked to the model measured and to the
    evaluation dataset (a dataset input of the run)."""
    if not evaluation:
        return
    dataset = evaluation.get("dataset")
    logged_models.log_datasets(run_id, [dataset] if dataset else [])
    logged_models.log_output(run_id, model_id)
    tracking.log_metrics(run_id, evaluation["metrics"], model=model_id, dataset=dataset)


def log_parent(parent: str | None, datasets: list[dict[str, Any]], final_model: str | None) -> None:
    """Every dataset the pipeline used, and its final model, on the parent run (the
    runs table's Dataset and Models columns)."""
    unique = list({(d["name"], d["digest"], d["context"]): d for d in datasets}.values())
    logged_models.log_datasets(parent, unique)
    logged_models.log_output(parent, final_model)


def urls(parent: str | None, experiment: str) -> dict[str, str]:
    """Where to look: the parent run's page and the model view in MLflow, the run in Kubeflow."""
    found: dict[str, str] = {}
    experiment_id = tracking.experiment_id(experiment) if parent and not parent.startswith(tracking.PLACEHOLDER) else None
    if experiment_id:
        found.update(mlflow_run_url=links.run_url(experiment_id, parent or ""), mlflow_experiment_url=links.experiment_url(experiment_id),
                     mlflow_models_url=links.models_url(experiment_id))
    if links.kfp_run_id():
        found["kfp_run_url"] = links.kfp_run_url(links.kfp_run_id() or "")
    return found
