"""Recipe → Kubeflow pipeline: import, baseline evaluation, the stages in order (each
followed by an evaluation of its output), and the report. Compiles to KFP IR YAML.
(No ``from __future__ import annotations``: KFP reads the pipeline's annotations.)"""

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes
from llmpress import __version__, parameters
from llmpress.cluster import apply_cluster
from llmpress.components.errors import UserError
from llmpress.components.kubeflow import shells as kubeflow
from llmpress.components.kubeflow import steps
from llmpress.recipe import PRODUCES_MODEL, Recipe, Resources

IMAGE_REPOSITORY = "ghcr.io/llmpress/llmpress"
DEFAULT_ACCELERATOR = "nvidia.com/gpu"


def default_image(flavor: str = "cuda") -> str:
    """The release image of this package version: ``cuda`` (GPU stack) or ``cpu`` (light steps).
    images/Makefile pushes exactly these names, so a release's pipeline finds its images."""
    return f"{IMAGE_REPOSITORY}-{flavor}:{__version__}"


def apply_resources(task: Any, resources: Resources) -> None:
    """Requests, limits, GPUs, node selector, tolerations, /dev/shm and scratch on one task."""
    if resources.cpu:
        task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu)
    if resources.memory:
        task.set_memory_request(resources.memory).set_memory_limit(resources.memory)
    if resources.gpus:
        task.set_accelerator_type(resources.accelerator or DEFAULT_ACCELERATOR)
        task.set_accelerator_limit(resources.gpus)
    for key, value in resources.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in resources.tolerations:
        kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
    if resources.shm or resources.gpus > 1:
        # NCCL and DataLoader workers share memory through /dev/shm; the runtime's 64Mi
        # default makes multi-GPU steps crash. Unsized, it counts against the memory limit.
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=resources.shm)
    if resources.scratch:  # where a step stages models it moves itself (storage.root on S3)
        task.set_env_variable("LLMPRESS_SCRATCH", resources.scratch.mount_path)
    if resources.scratch and resources.scratch.pvc:
        kubernetes.mount_pvc(task, pvc_name=resources.scratch.pvc, mount_path=resources.scratch.mount_path)
    elif resources.scratch:
        kubernetes.add_ephemeral_volume(
            task, volume_name="scratch", mount_path=resources.scratch.mount_path, access_modes=["ReadWriteOnce"],
            size=resources.scratch.size, storage_class_name=resources.scratch.storage_class,
        )


def model_step_names(recipe: Recipe, stages: list[Any]) -> list[str]:
    """The names of the steps making a chain's models, one per model-producing stage:
    ``run-stage-<hash of the chain so far>`` (each stage's settings and resources).
    kfp.local keys its cache by a step's component name, which KFP otherwise takes from
    the step's position; named by what it computes, a model step is reused by any
    pipeline computing the same chain: a later search, the plain recipe of its winner."""
    names, chain = [], ()
    for stage in stages:
        if stage.kind in PRODUCES_MODEL:
            chain += (recipe.stage_json(stage) + stage.resources.model_dump_json(),)
            names.append("run-stage-" + hashlib.sha256("\0".join(chain).encode()).hexdigest()[:10])
    return names


def build_pipeline(recipe: Recipe) -> Any:
    """The KFP pipeline function for ``recipe`` (call it under kfp.local, or compile it)."""
    for i, stage in enumerate(recipe.stages):
        if stage.kind not in steps.BUILT_KINDS:
            raise UserError.field(f"stages[{i}].kind", stage.kind, f"not built yet in this version; built: {', '.join(steps.BUILT_KINDS)}")
    # GPU steps get the CUDA image, the rest the slim CPU one; `image` overrides both.
    images = {"gpu": recipe.image or recipe.cluster.gpu_image or default_image("cuda"), "cpu": recipe.image or recipe.cluster.cpu_image or default_image("cpu")}

    def place(task: Any, resources: Resources) -> Any:
        apply_resources(task, resources)
        apply_cluster(task, recipe.cluster)
        return task

    if recipe.search is not None:  # builds its own steps from the same images
        from llmpress.search_pipeline import build_search_pipeline

        return build_search_pipeline(recipe, images, place)
    gpu_ops, cpu_ops = kubeflow.build(images["gpu"]), kubeflow.build(images["cpu"])
    recipe_json = recipe.model_dump_json()
    # what every step knows of the recipe; each step gets only the settings it uses, so
    # that editing one stage reruns that stage and what follows it, nothing before
    context = json.dumps({"recipe": recipe.name, "experiment": recipe.tracking.experiment, "storage": recipe.storage.root})
    evaluation = recipe.evaluation.model_dump_json(exclude={"after_each_stage", "resources"})
    eval_data = recipe.data.evaluation.model_dump_json()
    calibration = recipe.data.calibration.model_dump_json()
    params = parameters.run_parameters(recipe)
    validate_op, parameters_op = parameters.parameter_components(params, recipe.image or recipe.cluster.cpu_image or default_image("cpu"))

    def evaluate(model: Any, evals: Any, target: str, field: str, config_json: str, resources: Resources, values: dict[str, Any],
                 display: str = "") -> Any:
        ops = gpu_ops if resources.gpus else cpu_ops
        task = ops["evaluate"](model=model, config_json=config_json, data_json=eval_data, target=target, field=field, evals=evals,
                               evaluation_source=values["evaluation_source"], evaluation_samples=values["evaluation_samples"],
                               evaluation_seq_len=values["evaluation_seq_len"])
        task.set_display_name(display or f"evaluate-{target}")
        return place(task, resources).outputs["Output"]

    def pipeline(*args: Any) -> dsl.Artifact:
        values = dict(zip((p.name for p in params), args, strict=True))  # KFP passes the inputs in signature order
        # the effective recipe (recipe + run parameters) is checked before anything else starts
        base = recipe.model_dump_json(exclude_unset=True)  # what the recipe says, as it said it
        validated = validate_op(recipe_json=base, **values)
        validated.set_display_name("validate-recipe")
        place(validated, recipe.cluster.light_resources)
        # the run's parameters page; it runs when validation fails too, to say why
        page = parameters_op(recipe_json=base, **values).after(validated).ignore_upstream_failure()
        page.set_display_name("run-parameters")
        place(page, recipe.cluster.light_resources)
        imported = cpu_ops["import_model"](model_json=recipe.model.model_dump_json(), context_json=context,
                                           model_source=values["model_source"], model_revision=values["model_revision"])
        imported.set_display_name("import-model")
        imported.after(validated)
        place(imported, recipe.cluster.light_resources)
        model = imported.outputs["model"]
        # two chains of records: evaluations (baseline first) and model-producing stages
        baseline_model = model
        evals = evaluate(model, "", "baseline", "evaluation", evaluation, recipe.evaluation.resources, values)
        measured = {steps.measurement_key(evaluation, eval_data)}
        stages: Any = ""
        step_names = iter(model_step_names(recipe, recipe.stages))
        for i, stage in enumerate(recipe.stages):
            if stage.kind == "evaluate":
                config = stage.model_dump_json(include=set(type(stage).model_fields) - {"name", "kind", "resources"})
                key = steps.measurement_key(config, eval_data)
                if key not in measured:  # its ratios need a baseline measured the same way
                    measured.add(key)
                    evals = evaluate(baseline_model, evals, "baseline", f"stages.{stage.name}", config, stage.resources, values,
                                     f"evaluate-baseline-for-{stage.name}")
                evals = evaluate(model, evals, stage.name, f"stages.{stage.name}", config, stage.resources, values)
                continue
            ops = gpu_ops if stage.resources.gpus else cpu_ops
            settings = {p.path[2]: values[p.name] for p in params if p.path[:2] == ("stages", i)}
            run_stage = kubeflow.renamed(ops["run_stage"], next(step_names))
            task = run_stage(model=model, stage_json=recipe.stage_json(stage), calibration_json=calibration, context_json=context, stages=stages,
                             calibration_source=values["calibration_source"], calibration_samples=values["calibration_samples"],
                             calibration_seq_len=values["calibration_seq_len"], mlflow_experiment=values["mlflow_experiment"], **settings)
            task.set_display_name(stage.name)
            place(task, stage.resources)
            model, stages = task.outputs["model_out"], task.outputs["Output"]
            if stage.kind in PRODUCES_MODEL and recipe.evaluation.after_each_stage:
                evals = evaluate(model, evals, stage.name, "evaluation", evaluation, recipe.evaluation.resources, values)
        final = cpu_ops["finish"](stages=stages, evals=evals, recipe_json=recipe_json, changed=validated.output)
        final.set_display_name("report")
        place(final, recipe.cluster.light_resources)
        return final.outputs["results"]

    # KFP reads the pipeline's inputs (the run form) from its signature and their
    # descriptions from the docstring's Args section
    pipeline.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default, annotation=p.type) for p in params],
        return_annotation=dsl.Artifact)
    pipeline.__annotations__ = {**{p.name: p.type for p in params}, "return": dsl.Artifact}
    pipeline.__doc__ = parameters.docstring(recipe, params)
    pipeline = dsl.pipeline(name=recipe.name, description=recipe.description or f"llmpress recipe {recipe.name}")(pipeline)
    return pipeline


def compile_recipe(recipe: Recipe, output: str | Path) -> Path:
    """Write the KFP IR YAML for ``recipe``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(recipe), package_path=str(output))
    return output

