"""The KFP components: thin shells that map Kubeflow inputs and outputs onto
``steps`` (and through it the stage logic). Each body imports llmpress inside the
function, because KFP ships the function's source to the pod, where the image holds
the package. (No ``from __future__ import annotations``: KFP reads the annotations.)
"""

import copy
from functools import partial
from typing import Any, Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Model, Output


def import_model(model_json: str, context_json: str, model_source: str, model_revision: str, model: Output[Model]) -> None:
    """Fetch the model named by the recipe (with storage on S3: a pointer to it there)."""
    from llmpress.components.kubeflow import overrides, steps

    steps.import_model(overrides.model(model_json, model_source, model_revision), context_json, model.path)


def run_stage(model: Input[Model], stage_json: str, calibration_json: str, context_json: str, stages: str,
              calibration_source: str, calibration_samples: int, calibration_seq_len: int, mlflow_experiment: str,
              model_out: Output[Model], metrics: Output[Metrics],
              # KFP 2.17 reads Optional[X], not X | None
              scheme: Optional[str] = None, group_size: Optional[str] = None, method: Optional[str] = None, sparsity: Optional[float] = None,  # noqa: UP045
              steps: int = 0, learning_rate: Optional[float] = None, temperature: Optional[float] = None,  # noqa: UP045
              alpha: Optional[float] = None) -> str:  # noqa: UP045
    """Run one model-producing stage (distill, prune, quantize); returns the stages' records.

    The inputs after ``metrics`` are the stage's run parameters; the pipeline passes
    those of the stage's kind. ``steps`` left out is 0, never a valid step count
    (kfp.local 2.17 cannot pass an absent optional integer)."""
    from llmpress.components.kubeflow import overrides
    from llmpress.components.kubeflow import steps as step

    settings = {"scheme": scheme, "group_size": group_size, "method": method, "sparsity": sparsity, "steps": steps or None,
                "learning_rate": learning_rate, "temperature": temperature, "alpha": alpha}
    records, values = step.run_stage(model.path, model_out.path, overrides.stage(stage_json, settings),
                                     overrides.data(calibration_json, calibration_source, calibration_samples, calibration_seq_len),
                                     overrides.context(context_json, mlflow_experiment), stages)
    step.publish_metrics(metrics, values)
    return records


def evaluate(model: Input[Model], config_json: str, data_json: str, target: str, field: str, evals: str,
             evaluation_source: str, evaluation_samples: int, evaluation_seq_len: int, metrics: Output[Metrics]) -> str:
    """Evaluate a model against the baseline; returns the evaluations' records."""
    from llmpress.components.kubeflow import overrides, steps

    data_json = overrides.data(data_json, evaluation_source, evaluation_samples, evaluation_seq_len)
    records, values = steps.evaluate(model.path, config_json, data_json, target, field, evals)
    steps.publish_metrics(metrics, values)
    return records


def finish(stages: str, evals: str, recipe_json: str, changed: str, results: Output[Artifact], report: Output[Markdown], report_html: Output[HTML]) -> None:
    """Write results.json and the report (Markdown and HTML); record the run in MLflow.
    ``changed``: the fields the run parameters changed, from the validation step."""
    from llmpress.components.kubeflow import overrides, steps

    steps.finish(stages, evals, overrides.recipe(recipe_json, changed), results.path, report.path, report_html.path)


def build(image: str) -> dict[str, Any]:
    """The components, each running in ``image`` (which already holds kfp and llmpress)."""
    make = partial(dsl.component, base_image=image, install_kfp_package=False)
    return {fn.__name__: make(fn) for fn in (import_model, run_stage, evaluate, finish)}


def renamed(component: Any, name: str) -> Any:
    """The same component under another name (the name kfp.local keys its cache by)."""
    clone = copy.copy(component)
    clone.component_spec = copy.deepcopy(component.component_spec)
    clone.component_spec.name = clone.name = name
    return clone
