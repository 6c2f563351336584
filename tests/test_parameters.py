"""Run parameters: the recipe's main settings as inputs of the compiled pipeline (the
Kubeflow UI's run form), validated as an effective recipe by the pipeline's first step;
``--set`` on the CLI is the same mechanism. (No ``from __future__ import annotations``:
KFP reads the probe pipeline's annotations.)"""

import json

import pytest
import yaml
from conftest import TINY, model_steps, tiny_recipe

THREE_STAGES = tiny_recipe(
    name="three",
    teacher={"source": TINY},
    stages=[
        {"name": "kd", "kind": "distill", "steps": 20, "learning_rate": 3e-4, "temperature": 4.0, "alpha": 0.7,
         "student": {"source": "teacher", "num_layers": 1}},
        {"name": "wanda", "kind": "prune", "method": "wanda", "sparsity": 0.3},
        {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16", "group_size": 64, "resources": {"gpus": 1}},
    ],
    tracking={"experiment": "team-a", "register_as": "small-llama"},
)

AUTO = "or -1 (per output channel), or 'auto' (the largest of 128, 64, 32 that divides every quantized layer) (run parameter"
EXPECTED_DEFAULTS = {
    "model_source": TINY, "model_revision": "",
    "calibration_source": "builtin:pydoc-train", "calibration_samples": 16, "calibration_seq_len": 64,
    "evaluation_source": "builtin:pydoc-eval", "evaluation_samples": 24, "evaluation_seq_len": 64,
    "mlflow_experiment": "team-a", "registered_model_name": "small-llama",
    "kd_steps": 20, "kd_learning_rate": 3e-4, "kd_temperature": 4.0, "kd_alpha": 0.7,
    "wanda_method": "wanda", "wanda_sparsity": 0.3,
    "gptq_scheme": "gptq-w4a16", "gptq_group_size": "64",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from llmpress.pipeline import compile_recipe
    from llmpress.recipe import parse_recipe

    path = compile_recipe(parse_recipe(THREE_STAGES), tmp_path_factory.mktemp("params") / "p.yaml")
    return next(yaml.safe_load_all(path.read_text()))


def parse(recipe: dict):
    from llmpress.recipe import parse_recipe

    return parse_recipe(recipe)


def test_compiled_root_inputs_are_the_recipes_main_settings_with_its_values_as_defaults(compiled):
    inputs = compiled["root"]["inputDefinitions"]["parameters"]
    assert {name: spec.get("defaultValue") for name, spec in inputs.items()} == EXPECTED_DEFAULTS
    kinds = {name: spec["parameterType"] for name, spec in inputs.items()}
    assert kinds["kd_steps"] == kinds["calibration_samples"] == "NUMBER_INTEGER"
    assert kinds["wanda_sparsity"] == kinds["kd_learning_rate"] == "NUMBER_DOUBLE"
    assert kinds["model_source"] == kinds["gptq_scheme"] == "STRING"
    assert kinds["gptq_group_size"] == "STRING"  # 'auto' or a number


def test_every_parameter_has_a_description_naming_its_recipe_field(compiled):
    inputs = compiled["root"]["inputDefinitions"]["parameters"]
    assert inputs["gptq_group_size"]["description"].startswith("stage gptq (quantize): weights per scale")
    fixed = "(its GPUs, node selector and tolerations are fixed when the pipeline is compiled)"
    assert inputs["gptq_group_size"]["description"].endswith(f"{fixed}. Recipe field: stages[2].group_size")
    assert "one of rtn-w4a16, gptq-w4a16, awq-w4a16, w8a8, fp8, int8, nf4, fp4" in inputs["gptq_scheme"]["description"]
    assert "one of sparsegpt, wanda, magnitude, structured" in inputs["wanda_method"]["description"]
    assert all("Recipe field: " in spec["description"] for spec in inputs.values())


def test_each_step_takes_only_the_parameters_it_uses(compiled):
    tasks = compiled["root"]["dag"]["tasks"]

    def used(task: str) -> set[str]:
        return {p["componentInputParameter"] for p in tasks[task]["inputs"]["parameters"].values() if "componentInputParameter" in p}

    assert used("validate-recipe") == used("run-parameters") == set(EXPECTED_DEFAULTS)
    assert used("import-model") == {"model_source", "model_revision"}
    assert used("evaluate") == {"evaluation_source", "evaluation_samples", "evaluation_seq_len"}
    calibration = {"calibration_source", "calibration_samples", "calibration_seq_len", "mlflow_experiment"}
    kd, wanda, gptq = model_steps(THREE_STAGES)
    assert used(kd) == calibration | {"kd_steps", "kd_learning_rate", "kd_temperature", "kd_alpha"}
    assert used(wanda) == calibration | {"wanda_method", "wanda_sparsity"}
    assert used(gptq) == calibration | {"gptq_scheme", "gptq_group_size"}
    assert used("finish") == set()  # the report gets the changed fields from validate-recipe


def test_a_gpu_count_given_by_a_parameter_reaches_the_platform_spec_through_kfp():
    """What decided the docs' "cannot change per run" list: kfp 2.17 takes a pipeline
    parameter for the accelerator count (and node selector / tolerations as JSON); llmpress
    keeps them fixed per compiled pipeline (the image and /dev/shm follow from them)."""
    from kfp import compiler, dsl, kubernetes

    @dsl.component(base_image="python:3.11")
    def step() -> None:
        pass

    @dsl.pipeline
    def probe(gpus: int = 1, selector: dict = {"pool": "h100"}) -> None:  # noqa: B006 - KFP reads the default
        task = step().set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
        kubernetes.add_node_selector_json(task, selector)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        compiler.Compiler().compile(probe, str(Path(tmp) / "p.yaml"))
        spec, platform = yaml.safe_load_all((Path(tmp) / "p.yaml").read_text())
    accelerator = spec["deploymentSpec"]["executors"]["exec-step"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
    selector = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-step"]["nodeSelector"]
    assert selector == {"nodeSelectorJson": {"componentInputParameter": "selector"}}


def test_a_changed_value_replaces_the_recipe_field_and_an_unchanged_one_leaves_it_unset():
    from llmpress.parameters import effective_recipe

    recipe = parse(THREE_STAGES)
    effective = effective_recipe(recipe, {"gptq_group_size": "128", "wanda_sparsity": 0.3, "model_revision": ""})
    assert effective.stages[2].group_size == 128 and effective.stages[1].sparsity == 0.3
    assert effective.model.revision is None
    assert effective_recipe(recipe, {"wanda_sparsity": 0.3}) is recipe  # nothing changed, nothing re-parsed
    quantize = parse(tiny_recipe(stages=[{"name": "q", "kind": "quantize", "scheme": "gptq-w4a16"}]))
    assert "group_size" not in effective_recipe(quantize, {"q_scheme": "fp8", "q_group_size": "auto"}).stages[0].model_fields_set
    assert effective_recipe(quantize, {"q_group_size": "auto"}) is quantize


@pytest.mark.parametrize(("values", "line"), [
    ({"gptq_group_size": "7"}, f"gptq_group_size: 7 — allowed: 32, 64, 128, 256, {AUTO} for stages[2].group_size)"),
    ({"wanda_sparsity": 1.5}, "wanda_sparsity: 1.5 — Input should be less than 1 (run parameter for stages[1].sparsity)"),
    ({"gptq_scheme": "int3"}, "gptq_scheme: 'int3' — Input should be 'rtn-w4a16', 'gptq-w4a16', 'awq-w4a16', 'w8a8', 'fp8', 'int8', 'nf4' or 'fp4' "
                              "(run parameter for stages[2].scheme)"),
    ({"kd_steps": "many"}, "kd_steps: 'many' — must be an integer (sets stages[0].steps)"),
    ({"gpus": 2}, "parameter: 'gpus' — not a run parameter of three; known: " + ", ".join(EXPECTED_DEFAULTS)),
])
def test_a_bad_value_is_one_line_naming_the_parameter(values, line):
    from llmpress.components.errors import UserError
    from llmpress.parameters import effective_recipe

    with pytest.raises(UserError) as err:
        effective_recipe(parse(THREE_STAGES), values)
    assert err.value.problems == [line]


def test_set_takes_a_parameter_name_or_the_stage_field_or_the_recipe_field():
    from llmpress.parameters import parse_sets

    values = parse_sets(parse(THREE_STAGES), ["gptq_group_size=32", "wanda.sparsity=0.5", "data.calibration.num_samples=8", "model_source=hf:org/m"])
    assert values == {"gptq_group_size": "32", "wanda_sparsity": 0.5, "calibration_samples": 8, "model_source": "hf:org/m"}


def test_validate_with_a_bad_set_is_one_line_and_exit_2(write_recipe, capsys):
    from llmpress.cli import main

    path = str(write_recipe(THREE_STAGES))
    assert main(["validate", path, "--set", "gptq.group_size=64"]) == 0
    assert main(["validate", path, "--set", "gptq.group_size=63"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llmpress: error: gptq_group_size: 63 — allowed: 32, 64, 128, 256, {AUTO} for stages[2].group_size)"]


def test_the_validation_step_returns_the_changed_fields_and_the_report_step_applies_them():
    from llmpress.components.kubeflow import overrides
    from llmpress.parameters import validate_in_step

    recipe = parse(THREE_STAGES)
    changed = validate_in_step(recipe.model_dump_json(exclude_unset=True), {"gptq_group_size": "32", "kd_alpha": 0.7, "mlflow_experiment": "b"})
    assert json.loads(changed) == [[["stages", 2, "group_size"], 32], [["tracking", "experiment"], "b"]]
    effective = json.loads(overrides.recipe(recipe.model_dump_json(), changed))
    assert effective["stages"][2]["group_size"] == 32 and effective["tracking"]["experiment"] == "b"
    assert effective["stages"][0]["alpha"] == 0.7


def test_a_step_applies_only_values_that_differ_from_its_settings():
    from llmpress.components.kubeflow import overrides

    stage = json.dumps({"name": "q", "kind": "quantize", "scheme": "fp8"})
    assert json.loads(overrides.stage(stage, {"scheme": "fp8", "group_size": None})) == {"name": "q", "kind": "quantize", "scheme": "fp8"}
    assert json.loads(overrides.stage(stage, {"scheme": "gptq-w4a16"}))["scheme"] == "gptq-w4a16"
    data = json.dumps({"source": "builtin:pydoc-train", "num_samples": 16, "seq_len": 64})
    assert json.loads(overrides.data(data, "builtin:pydoc-train", 8, 64)) == {"source": "builtin:pydoc-train", "num_samples": 8, "seq_len": 64}


def test_the_parameters_page_keeps_a_value_from_the_form_inside_its_cell(tmp_path):
    from llmpress.parameters import parameters_report

    recipe = parse(THREE_STAGES)
    parameters_report(recipe.model_dump_json(exclude_unset=True), {"model_source": "x|`<img src=y>\n"}, str(tmp_path / "page.md"))
    (row,) = [line for line in (tmp_path / "page.md").read_text().splitlines() if line.startswith("| `model_source`")]
    assert row == "| `model_source` | `'x\\|'<img src=y>\\n'` (changed) | `'builtin:pydoc-llama-tiny'` | `model.source` |"


def test_a_parameters_file_gives_values_and_set_wins(tmp_path):
    from llmpress.parameters import parse_sets

    path = tmp_path / "p.yaml"
    path.write_text("gptq_group_size: 32\nwanda.sparsity: 0.4\nmodel_source: hf:org/m\n")
    values = parse_sets(parse(THREE_STAGES), ["gptq_group_size=128"], path)
    assert values == {"gptq_group_size": "128", "wanda_sparsity": 0.4, "model_source": "hf:org/m"}


@pytest.mark.parametrize(("text", "line"), [
    ("gptq_group_size: [32]\n", "--parameters gptq_group_size: [32] — must be text (sets stages[2].group_size)"),
    ("kd_steps: true\n", "--parameters kd_steps: True — must be an integer (sets stages[0].steps)"),
    ("- gptq_group_size\n", "--parameters: '{path}' — a mapping of run parameter: value"),
])
def test_a_bad_parameters_file_is_one_line(tmp_path, text, line):
    from llmpress.components.errors import UserError
    from llmpress.parameters import parse_sets

    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        parse_sets(parse(THREE_STAGES), [], path)
    assert err.value.problems == [line.format(path=path)]


def test_a_number_written_as_an_integer_in_the_recipe_is_still_a_number_in_the_form():
    from llmpress.parameters import run_parameters

    recipe = dict(THREE_STAGES, stages=[{**THREE_STAGES["stages"][0], "alpha": 1}, *THREE_STAGES["stages"][1:]])
    (alpha,) = [p for p in run_parameters(parse(recipe)) if p.name == "kd_alpha"]
    assert (alpha.type, alpha.default) == (float, 1.0)
