"""The KFP components: thin shells that map Kubeflow inputs and outputs onto
``steps`` (and through it the stage logic). Each body imports llmpress inside the
function, because KFP ships the function's source to the pod, where the image holds
the package. (No ``from __future__ import annotations``: KFP reads the annotations.)
"""

from functools import partial
from typing import Any

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Model, Output


def import_model(model_json: str, recipe_json: str, model: Output[Model]) -> str:
    """Fetch the model named by the recipe and open the run's tracking."""
    from llmpress.components import steps

    return steps.import_model(model_json, recipe_json, model.path)


def run_stage(model: Input[Model], stage_json: str, calibration_json: str, history: str, model_out: Output[Model], metrics: Output[Metrics]) -> str:
    """Run one model-producing stage (distill, prune, quantize)."""
    from llmpress.components import steps

    new_history, values = steps.run_stage(model.path, model_out.path, stage_json, calibration_json, history)
    steps.publish_metrics(metrics, values)
    return new_history


def evaluate(model: Input[Model], config_json: str, data_json: str, target: str, history: str, metrics: Output[Metrics]) -> str:
    """Evaluate a model against the baseline."""
    from llmpress.components import steps

    new_history, values = steps.evaluate(model.path, config_json, data_json, target, history)
    steps.publish_metrics(metrics, values)
    return new_history


def finish(history: str, results: Output[Artifact], report: Output[Markdown], report_html: Output[HTML]) -> None:
    """Write results.json and the report (Markdown and HTML); close the tracking run."""
    from llmpress.components import steps

    steps.finish(history, results.path, report.path, report_html.path)


def build(image: str) -> dict[str, Any]:
    """The components, each running in ``image`` (which already holds kfp and llmpress)."""
    make = partial(dsl.component, base_image=image, install_kfp_package=False)
    return {fn.__name__: make(fn) for fn in (import_model, run_stage, evaluate, finish)}
