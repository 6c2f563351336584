"""The KFP components: thin shells that map Kubeflow inputs and outputs onto
``steps`` (and through it the stage logic). Each body imports llmpress inside the
function, because KFP ships the function's source to the pod, where the image holds
the package. (No ``from __future__ import annotations``: KFP reads the annotations.)
"""

from functools import partial
from typing import Any

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Model, Output


def import_model(model_json: str, context_json: str, model: Output[Model]) -> None:
    """Fetch the model named by the recipe (with storage on S3: a pointer to it there)."""
    from llmpress.components.kubeflow import steps

    steps.import_model(model_json, context_json, model.path)


def run_stage(model: Input[Model], stage_json: str, calibration_json: str, context_json: str, stages: str,
              model_out: Output[Model], metrics: Output[Metrics]) -> str:
    """Run one model-producing stage (distill, prune, quantize); returns the stages' records."""
    from llmpress.components.kubeflow import steps

    records, values = steps.run_stage(model.path, model_out.path, stage_json, calibration_json, context_json, stages)
    steps.publish_metrics(metrics, values)
    return records


def evaluate(model: Input[Model], config_json: str, data_json: str, target: str, field: str, evals: str, metrics: Output[Metrics]) -> str:
    """Evaluate a model against the baseline; returns the evaluations' records."""
    from llmpress.components.kubeflow import steps

    records, values = steps.evaluate(model.path, config_json, data_json, target, field, evals)
    steps.publish_metrics(metrics, values)
    return records


def finish(stages: str, evals: str, recipe_json: str, results: Output[Artifact], report: Output[Markdown], report_html: Output[HTML]) -> None:
    """Write results.json and the report (Markdown and HTML); record the run in MLflow."""
    from llmpress.components.kubeflow import steps

    steps.finish(stages, evals, recipe_json, results.path, report.path, report_html.path)


def build(image: str) -> dict[str, Any]:
    """The components, each running in ``image`` (which already holds kfp and llmpress)."""
    make = partial(dsl.component, base_image=image, install_kfp_package=False)
    return {fn.__name__: make(fn) for fn in (import_model, run_stage, evaluate, finish)}
