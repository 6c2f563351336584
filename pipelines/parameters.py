"""Run parameters: the recipe's main settings as inputs of the compiled pipeline, so that
the Kubeflow UI's "Create run" form shows them with the recipe's values as defaults.

One mechanism serves the UI, ``llmpress run --set`` and ``llmpress submit --set``: a
parameter names one recipe field (``gptq_group_size`` is ``stages[0].group_size``); a
value that differs from the recipe's replaces that field, and the resulting *effective
recipe* is validated with the rules of ``llmpress validate``. In a pipeline run that is
its first step, ``validate-recipe``; each later step receives only the parameters it
uses, so changing one stage's parameter reruns that stage and what follows it.

What a parameter cannot change is fixed when the pipeline is compiled: the stages, their
order and kinds, images, GPU/CPU placement and every other ``resources`` field
(docs/cluster.md, "Run parameters").
"""

from __future__ import annotations

import hashlib
import json
import linecache
import typing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from llmpress import untrusted_yaml
from llmpress.components.errors import UserError, short
from llmpress.components.kubeflow import overrides
from llmpress.components.stages.quantize import SCHEME_FIELDS
from llmpress.recipe import Recipe, parse_recipe

# the settings of each kind a run may change (a stage of kind evaluate has none), with the
# type the run form takes: group_size is text, 'auto' or a number
STAGE_PARAMETERS: dict[str, dict[str, type]] = {
    "quantize": {"scheme": str, "group_size": str},
    "prune": {"method": str, "sparsity": float},
    "distill": {"steps": int, "learning_rate": float, "temperature": float, "alpha": float},
    "evaluate": {},
}
TYPE_NAMES = {str: "text", int: "an integer", float: "a number"}
# said in every stage parameter's description: the run form is where a user looks for it
FIXED = "its GPUs, node selector and tolerations are fixed when the pipeline is compiled"


@dataclass(frozen=True)
class RunParameter:
    """One input of the compiled pipeline and the recipe field it sets."""

    name: str
    path: tuple[str | int, ...]
    type: type
    default: Any
    description: str

    @property
    def field(self) -> str:
        """The recipe field, spelled as ``llmpress validate`` spells it."""
        return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path).lstrip(".")


def run_parameters(recipe: Recipe) -> list[RunParameter]:
    """The run parameters of ``recipe``, defaults its own values, in the form's order."""
    calibration, evaluation = recipe.data.calibration, recipe.data.evaluation
    params = [
        RunParameter("model_source", ("model", "source"), str, recipe.model.source,
                     "model to compress: a local folder, s3://bucket/prefix, hf:ORG/NAME or builtin:NAME"),
        RunParameter("model_revision", ("model", "revision"), str, recipe.model.revision or "",
                     "git revision of an hf: model; empty: its default branch"),
        RunParameter("calibration_source", ("data", "calibration", "source"), str, calibration.source,
                     "calibration text: builtin:NAME, s3://…/file (.txt, .jsonl, .parquet) or hf:NAME"),
        RunParameter("calibration_samples", ("data", "calibration", "num_samples"), int, calibration.num_samples,
                     "calibration sequences (1-100000)"),
        RunParameter("calibration_seq_len", ("data", "calibration", "seq_len"), int, calibration.seq_len,
                     "tokens per calibration sequence (1-131072)"),
        RunParameter("evaluation_source", ("data", "evaluation", "source"), str, evaluation.source,
                     "evaluation text: builtin:NAME, s3://…/file (.txt, .jsonl, .parquet) or hf:NAME"),
        RunParameter("evaluation_samples", ("data", "evaluation", "num_samples"), int, evaluation.num_samples,
                     "most evaluation windows (1-100000)"),
        RunParameter("evaluation_seq_len", ("data", "evaluation", "seq_len"), int, evaluation.seq_len,
                     "tokens per evaluation window (1-131072)"),
        RunParameter("mlflow_experiment", ("tracking", "experiment"), str, recipe.tracking.experiment,
                     "MLflow experiment of the run"),
        RunParameter("registered_model_name", ("tracking", "register_as"), str, recipe.tracking.register_as or recipe.name,
                     "MLflow Model Registry name of the final model"),
    ]
    for i, stage in enumerate(recipe.stages):
        fields = type(stage).model_fields
        for name, value in stage_settings(stage).items():
            kind = STAGE_PARAMETERS[stage.kind][name]
            about = fields[name].description or name
            allowed = typing.get_args(fields[name].annotation)
            if allowed and all(isinstance(a, str) for a in allowed):
                about += f"; one of {', '.join(allowed)}"
            params.append(RunParameter(f"{_identifier(stage.name)}_{name}", ("stages", i, name), kind, value,
                                       f"stage {stage.name} ({stage.kind}): {about} ({FIXED})"))
    names = [p.name for p in params]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # stage-4b and a stage 4b both become stage_4b_...
        raise UserError.field("stages", twice[0], "two stages give run parameters of the same name; rename one stage")
    return params


def stage_settings(stage: Any) -> dict[str, Any]:
    """The values a stage's run parameters default to (its own settings, typed as the run
    form takes them), by field: what its model step receives when no run changes them."""
    settings = {}
    for name, kind in STAGE_PARAMETERS[stage.kind].items():
        if name == "group_size" and stage.scheme not in SCHEME_FIELDS["group_size"]:
            continue  # the other schemes refuse a group size
        if name == "sparsity" and stage.method == "structured":
            continue  # structured pruning is sized by ffn/attention sparsity
        value = getattr(stage, name)
        if value is None and name == "sparsity":
            value = 0.5  # what unstructured pruning uses when the recipe says nothing
        settings[name] = kind(value)  # alpha: 1 in a recipe is 1.0 in the form
    return settings


def _identifier(stage_name: str) -> str:
    """A stage's name as the start of a parameter name (a Python identifier: KFP's rule)."""
    name = stage_name.replace("-", "_")
    return f"stage_{name}" if name[0].isdigit() else name


def _normalized(param: RunParameter, value: Any) -> Any:
    """A value as the recipe holds it: an empty optional text is no value, '64' a group size."""
    if param.path in (("model", "revision"), ("tracking", "register_as")) and value == "":
        return None
    return overrides.recipe_value(str(param.path[-1]), value)


def _typed(param: RunParameter, value: Any) -> Any:
    if param.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, param.type) or isinstance(value, bool):
        raise UserError.field(param.name, value, f"must be {TYPE_NAMES[param.type]} (sets {param.field})")
    return value


def changes(recipe: Recipe, values: dict[str, Any]) -> list[tuple[RunParameter, Any]]:
    """The parameters whose value differs from the recipe's, with that value; an unknown
    name or a value of the wrong type is a ``UserError``."""
    params = {p.name: p for p in run_parameters(recipe)}
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise UserError.field("parameter", unknown[0], f"not a run parameter of {recipe.name}; known: {', '.join(params)}")
    changed = []
    for name, value in values.items():
        param = params[name]
        value = _typed(param, value)
        if value != param.default:
            changed.append((param, _normalized(param, value)))
    return changed


def effective_recipe(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """``recipe`` with the run parameters' values, validated as ``llmpress validate``
    validates a file; a problem names the parameter and the field it sets."""
    changed = changes(recipe, values)
    if not changed:
        return recipe
    data = recipe.model_dump(mode="json", exclude_unset=True)  # what the recipe says, as it said it
    for param, value in changed:
        overrides.set_path(data, param.path, value)
    try:
        return parse_recipe(data)
    except UserError as err:
        named = {p.field: p.name for p, _ in changed}
        lines = []
        for line in err.problems:
            field, _, rest = line.partition(":")
            lines.append(f"{named[field]}:{rest} (run parameter for {field})" if field in named else line)
        raise UserError(*lines) from None


def _by_key(recipe: Recipe) -> dict[str, RunParameter]:
    """Each parameter under its name, its recipe field and ``STAGE.FIELD``."""
    params = run_parameters(recipe)
    keys = {p.field: p for p in params}
    keys.update({f"{recipe.stages[p.path[1]].name}.{p.path[2]}": p for p in params if p.path[0] == "stages"})
    keys.update({p.name: p for p in params})
    return keys


def parse_sets(recipe: Recipe, assignments: list[str], parameters_file: Path | None = None) -> dict[str, Any]:
    """Run parameter values from a ``--parameters`` YAML file (``KEY: VALUE``), then from
    ``--set`` arguments (``KEY=VALUE``), which win; KEY is a parameter's name
    (``gptq_group_size``), ``STAGE.FIELD`` (``gptq.group_size``) or a recipe field
    (``data.calibration.num_samples``)."""
    keys = _by_key(recipe)
    names = ", ".join(p.name for p in run_parameters(recipe))
    values: dict[str, Any] = {}
    if parameters_file is not None:
        if not parameters_file.is_file():
            raise UserError.field("--parameters", str(parameters_file), "file not found")
        data = untrusted_yaml.load(parameters_file, "--parameters")
        if not isinstance(data, dict):
            raise UserError.field("--parameters", str(parameters_file), "a mapping of run parameter: value")
        for key, value in data.items():
            param = keys.get(key) if isinstance(key, str) else None
            if param is None:
                raise UserError.field(f"--parameters {parameters_file}", key, f"not a run parameter of {recipe.name}; known: {names}")
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise UserError.field(f"--parameters {param.name}", value, f"must be {TYPE_NAMES[param.type]} (sets {param.field})")
            values[param.name] = _parsed(param, str(value))
    for text in assignments:
        key, sep, raw = text.partition("=")
        param = keys.get(key.strip())
        if not sep or param is None:
            raise UserError.field("--set", text, f"KEY=VALUE with KEY one of {names} (or STAGE.FIELD)")
        values[param.name] = _parsed(param, raw.strip())
    return values


def _parsed(param: RunParameter, raw: str) -> Any:
    if param.type is str:
        return raw
    try:
        return param.type(raw)
    except ValueError:
        raise UserError.field(f"--set {param.name}", raw, f"must be {TYPE_NAMES[param.type]} (sets {param.field})") from None


def validate_in_step(recipe_json: str, values: dict[str, Any]) -> str:
    """The pipeline's first step: the effective recipe validated; returns the changed
    fields as JSON ``[[path, value], ...]`` for the report step."""
    recipe = parse_recipe(json.loads(recipe_json))
    changed = changes(recipe, values)
    effective_recipe(recipe, values)
    return json.dumps([[list(p.path), value] for p, value in changed])


def parameters_report(recipe_json: str, values: dict[str, Any], markdown_path: str) -> None:
    """The run's parameters as Markdown (its "run-parameters" step): each parameter's
    value and recipe field, marked where it differs from the recipe; for a refused
    value, the line that ended the run in validate-recipe instead. Never fails: it runs
    whether or not the validation passed, so that the UI always has this page."""
    recipe = parse_recipe(json.loads(recipe_json))
    try:
        effective_recipe(recipe, values)
        problems: list[str] = []
    except UserError as err:
        problems = err.problems
    lines = ["# Run parameters", ""]
    if problems:
        lines += ["**Refused**: the run stopped in its first step, validate-recipe, before any other step started:", ""]
        lines += [f"    llmpress: error: {problem}" for problem in problems] + [""]
    lines += ["| parameter | value | recipe's value | recipe field |", "| --- | --- | --- | --- |"]
    for param in run_parameters(recipe):
        value = values.get(param.name, param.default)
        mark = "" if value == param.default else " (changed)"
        lines.append(f"| `{param.name}` | {_cell(value)}{mark} | {_cell(param.default)} | `{param.field}` |")
    lines += ["", "Not run parameters, fixed when the pipeline was compiled: the stages, each step's GPUs, node selector, "
                  "tolerations and other resources, the images and every other recipe field."]
    Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
    Path(markdown_path).write_text("\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    """A value from the run form as a table cell: a code span (where Markdown takes HTML
    as text) that no backtick can end and no pipe can split; repr keeps it on one line."""
    text = short(value, 120).replace("`", "'").replace("|", "\\|")
    return f"`{text}`"


def parameter_components(params: list[RunParameter], image: str) -> tuple[Any, Any]:
    """The ``validate-recipe`` component (the recipe as JSON and every run parameter in,
    the changed fields out; exit 2 on a bad value) and the ``run-parameters`` component
    (the same inputs, a Markdown page out).

    KFP reads a lightweight component's inputs from its function's signature and ships
    the function's source to the pod, so a pipeline with its own set of parameters needs
    functions written for it: these two are generated, and only forward their arguments."""
    from kfp import dsl
    from kfp.dsl import Markdown, Output

    inputs = ", ".join(f"{p.name}: {p.type.__name__}" for p in params)
    values = "{" + ", ".join(f"{p.name!r}: {p.name}" for p in params) + "}"
    source = (
        f"def validate_recipe(recipe_json: str, {inputs}) -> str:\n"
        '    """Validate the effective recipe (the recipe and the run parameters) before any other step."""\n'
        "    from llmpress.components.kubeflow.steps import user_errors_exit\n"
        "    from llmpress.parameters import validate_in_step\n\n"
        f"    return user_errors_exit(validate_in_step)(recipe_json, {values})\n\n\n"
        f"def run_parameters(recipe_json: str, {inputs}, parameters: Output[Markdown]) -> None:\n"
        '    """The run parameters as a Markdown page, or the line that refused them."""\n'
        "    from llmpress.parameters import parameters_report\n\n"
        f"    parameters_report(recipe_json, {values}, parameters.path)\n"
    )
    filename = f"<llmpress run parameters {hashlib.sha256(source.encode()).hexdigest()[:16]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # inspect.getsource reads it here
    namespace: dict[str, Any] = {"Output": Output, "Markdown": Markdown}
    # names are identifiers, types str/int/float; dont_inherit: KFP needs real annotations, not this module's strings
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    make = partial(dsl.component, base_image=image, install_kfp_package=False)
    return make(namespace["validate_recipe"]), make(namespace["run_parameters"])


def docstring(recipe: Recipe, params: list[RunParameter]) -> str:
    """The pipeline function's docstring: KFP turns its Args section into the
    parameters' descriptions in the compiled pipeline."""
    lines = [recipe.description or f"llmpress recipe {recipe.name}", "", "Args:"]
    lines += [f"    {p.name}: {p.description}. Recipe field: {p.field}" for p in params]
    return "\n".join(lines)
