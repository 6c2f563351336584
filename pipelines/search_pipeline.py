"""A search recipe → one Kubeflow pipeline: import → baseline → every candidate chain as
branches of the same stage steps → a cheap screening evaluation of every candidate →
the choice of who goes on → the full evaluation of those → the search's report.

- Shared prefixes run once: a step is made per distinct chain prefix (the same pruned
  model feeds every quantize option after it), named by that prefix
  (``pipeline.model_step_names``) and given the inputs the plain pipeline gives the same
  stage, so that KFP's cache (kfp.local's too, which keys by name) reuses any model step
  an earlier search already ran, wherever it sits in this one, and the winner's recipe
  finds its model steps there.
- Parallelism: the model-producing steps, in the order they are made (parents first),
  are dealt round-robin into ``search.parallelism`` lanes; each step waits for the one
  before it in its lane, so at most that many run at once, on the node pools of their
  own ``resources``.
- The candidates' evaluations pass one chain of records (as the plain pipeline's do),
  which also carries each candidate's stage records to the report step: the screening
  chain, then the full chain, where candidates the screening left out pass as skipped.
(No ``from __future__ import annotations``: KFP reads the pipeline's annotations.)
"""

import json
from typing import Any

from kfp import dsl
from llmpress import parameters
from llmpress.components.kubeflow import search_shells
from llmpress.components.kubeflow import shells as kubeflow
from llmpress.pipeline import model_step_names
from llmpress.recipe import Recipe


def search_json(recipe: Recipe) -> str:
    """What the select and report steps know of the search: budget, candidates (their
    stages as a plain recipe writes them) and the recipe without its search block."""
    search = recipe.search
    assert search is not None
    plain = recipe.model_dump(mode="json", exclude_unset=True, exclude={"search", "stages"})
    return json.dumps({
        "budget": search.budget.model_dump(exclude_none=True), "objective": search.objective, "parallelism": search.parallelism,
        "screen": search.screen.model_dump() if search.screen else None,
        "candidates": [{"name": c.name, "label": c.label, "stages": list(c.stages)} for c, _ in recipe.search_candidates()],
        "plain_recipe": plain,
    }, sort_keys=True)


def build_search_pipeline(recipe: Recipe, images: dict[str, str], place: Any) -> Any:
    """The KFP pipeline function of a search recipe; ``images`` are the GPU and CPU
    images (``{"gpu", "cpu"}``), ``place`` applies a step's resources and cluster settings."""
    search = recipe.search
    assert search is not None
    gpu_ops, cpu_ops = kubeflow.build(images["gpu"]), kubeflow.build(images["cpu"])
    context = json.dumps({"recipe": recipe.name, "experiment": recipe.tracking.experiment, "storage": recipe.storage.root})
    evaluation = recipe.evaluation.model_dump_json(exclude={"after_each_stage", "resources"})
    eval_data = recipe.data.evaluation.model_dump_json()
    calibration = recipe.data.calibration.model_dump_json()
    # the screening: perplexity over a few windows and size; no tasks, speed, sample or
    # sparsity count (unpacking every 4-bit code: a tenth of a screening step on SmolLM2),
    # and windows that do not overlap (an overlapping stride rescores context: more compute per scored token)
    screen_config = recipe.evaluation.model_copy(update={"tasks": [], "sample_tokens": 0, "data": None, "stride": None, "count_sparsity": False})
    screen_config = screen_config.model_dump(mode="json", exclude={"after_each_stage", "resources"})
    screen_config["latency"]["batch_sizes"] = []
    eval_spec = recipe.evaluation.data or recipe.data.evaluation
    screen_data = eval_spec.model_copy(update={"num_samples": min(search.screen.windows, eval_spec.num_samples)}).model_dump_json() if search.screen else ""
    resources = recipe.evaluation.resources
    eval_ops = gpu_ops if resources.gpus else cpu_ops
    search_ops = search_shells.build(images["gpu"] if resources.gpus else images["cpu"])
    chains = recipe.search_candidates()
    everything = search_json(recipe)
    # a search takes no run parameters: the components' parameter inputs get the recipe's values
    calibration_args = {"calibration_source": recipe.data.calibration.source, "calibration_samples": recipe.data.calibration.num_samples,
                        "calibration_seq_len": recipe.data.calibration.seq_len, "mlflow_experiment": recipe.tracking.experiment}

    def evaluation_args(data_json: str) -> dict[str, Any]:
        spec = json.loads(data_json)
        return {"evaluation_source": spec["source"], "evaluation_samples": spec["num_samples"], "evaluation_seq_len": spec["seq_len"]}

    @dsl.pipeline(name=recipe.name, description=recipe.description or f"llmpress search {recipe.name}")
    def pipeline() -> dsl.Artifact:
        imported = cpu_ops["import_model"](model_json=recipe.model.model_dump_json(), context_json=context, model_source=recipe.model.source,
                                           model_revision=recipe.model.revision or "")
        imported.set_display_name("import-model")
        place(imported, recipe.cluster.light_resources)
        base_model = imported.outputs["model"]
        baseline = eval_ops["evaluate"](model=base_model, config_json=evaluation, data_json=eval_data, target="baseline", field="evaluation", evals="",
                                        **evaluation_args(eval_data))
        baseline.set_display_name("evaluate-baseline")
        place(baseline, resources)

        made: dict[tuple[str, ...], tuple[Any, Any]] = {}
        lanes: list[Any] = [None] * search.parallelism
        leaves = []
        for candidate, stages in chains:
            model, records = base_model, ""
            for stage, name in zip(stages, model_step_names(recipe, stages), strict=True):
                if name not in made:
                    ops = gpu_ops if stage.resources.gpus else cpu_ops
                    # the inputs of the plain pipeline's step for the same stage (its run parameters
                    # at their defaults), so that the winner's recipe finds this step in the cache
                    task = kubeflow.renamed(ops["run_stage"], name)(
                        model=model, stage_json=recipe.stage_json(stage), calibration_json=calibration, context_json=context, stages=records,
                        **calibration_args, **parameters.stage_settings(stage))
                    task.set_display_name(stage.name)
                    place(task, stage.resources)
                    lane = len(made) % search.parallelism
                    if lanes[lane] is not None:
                        task.after(lanes[lane])
                    lanes[lane] = task
                    made[name] = (task.outputs["model_out"], task.outputs["Output"])
                model, records = made[name]
            leaves.append((candidate, model, records))

        def evaluate_all(config: str, data: str, evals: Any, decision: Any, phase: str) -> Any:
            for candidate, model, records in leaves:
                task = search_ops["evaluate_candidate"](model=model, stages=records, config_json=config, data_json=data, candidate=candidate.name,
                                                        decision=decision, evals=evals)
                task.set_display_name(f"{phase}-{candidate.name}")
                place(task, resources)
                evals = task.outputs["Output"]
            return evals

        screened: Any = ""
        decision: Any = ""
        if search.screen:
            screen_base = eval_ops["evaluate"](model=base_model, config_json=json.dumps(screen_config), data_json=screen_data, target="baseline",
                                               field="evaluation", evals="", **evaluation_args(screen_data))
            screen_base.set_display_name("screen-baseline")
            place(screen_base, resources)
            screened = evaluate_all(json.dumps(screen_config), screen_data, screen_base.outputs["Output"], "", "screen")
            chosen = search_ops["select_candidates"](screened=screened, search_json=everything)
            chosen.set_display_name("select-candidates")
            place(chosen, recipe.cluster.light_resources)
            decision = chosen.output
        evaluated = evaluate_all(evaluation, eval_data, baseline.outputs["Output"], decision, "evaluate")
        final = search_ops["finish_search"](screened=screened, evaluated=evaluated, decision=decision, search_json=everything,
                                            recipe_json=recipe.model_dump_json())
        final.set_display_name("report")
        place(final, recipe.cluster.light_resources)
        return final.outputs["results"]

    return pipeline
