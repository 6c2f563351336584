"""The KFP components a search adds to the plain pipeline's (``shells``): thin shells over
``search_steps``. (No ``from __future__ import annotations``: KFP reads the annotations.)
"""

from functools import partial
from typing import Any

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Model, Output


def evaluate_candidate(model: Input[Model], stages: str, config_json: str, data_json: str, candidate: str, decision: str, evals: str,
                       metrics: Output[Metrics]) -> str:
    """Evaluate one candidate against the baseline (skipped when the screening's decision left it out)."""
    from llmpress.components.kubeflow import search_steps, steps

    records, values = search_steps.evaluate_candidate(model.path, stages, config_json, data_json, candidate, decision, evals)
    steps.publish_metrics(metrics, values)
    return records


def select_candidates(screened: str, search_json: str) -> str:
    """After the screening: the candidates the full evaluation measures, and why the others stop."""
    from llmpress.components.kubeflow import search_steps

    return search_steps.select_candidates(screened, search_json)


def finish_search(screened: str, evaluated: str, decision: str, search_json: str, recipe_json: str, results: Output[Artifact],
                  report: Output[Markdown], report_html: Output[HTML], winner_recipe: Output[Artifact], metrics: Output[Metrics]) -> None:
    """results.json, the report with the Pareto front, the winner's recipe; MLflow's parent run."""
    from llmpress.components.kubeflow import search_steps, steps

    figures = search_steps.finish_search(screened, evaluated, decision, search_json, recipe_json, results.path, report.path,
                                         report_html.path, winner_recipe.path)
    steps.publish_metrics(metrics, figures)


def build(image: str) -> dict[str, Any]:
    """The search's components, each running in ``image``."""
    make = partial(dsl.component, base_image=image, install_kfp_package=False)
    return {fn.__name__: make(fn) for fn in (evaluate_candidate, select_candidates, finish_search)}

