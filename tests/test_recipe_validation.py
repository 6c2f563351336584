"""`llmpress validate`: ok for good recipes, one clear line per problem (exit 2) otherwise."""

from __future__ import annotations

import copy

import pytest
from conftest import ROOT, run_cli, tiny_recipe
from llmpress.cli import main


def stage(**fields):
    return {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16", **fields}


BROKEN = {  # noqa: E501 (one case a line reads best)
    # case id: (recipe or raw YAML text, text the single error line must contain)
    "unknown-top-level-key": (tiny_recipe(modle={"source": "x"}), "modle: unknown key — allowed keys: name, description, model"),
    "unknown-stage-key": (tiny_recipe(stages=[stage(bits=3)]), "stages[0].bits: unknown key — allowed keys:"),
    "unknown-stage-kind": (tiny_recipe(stages=[{"name": "s", "kind": "sparsify"}]), "stages[0].kind: 'sparsify' — allowed: distill, prune, quantize, evaluate"),
    "stage-kind-missing": (tiny_recipe(stages=[{"name": "s"}]), "stages[0].kind: missing"),
    "unknown-scheme": (tiny_recipe(stages=[stage(scheme="int3")]), "stages[0].scheme: 'int3' — Input should be"),
    "bad-group-size": (tiny_recipe(stages=[stage(group_size=100)]), "stages[0].group_size: 100 — allowed: 32, 64, 128, 256, or -1"),
    "negative-gpus": (tiny_recipe(stages=[stage(resources={"gpus": -1})]), "stages[0].resources.gpus: -1 — Input should be greater than or equal to 0"),
    "negative-seq-len": (tiny_recipe(data={"calibration": {"source": "builtin:pydoc-train", "seq_len": -8}}), "data.calibration.seq_len: -8 — Input should be greater than 0"),  # noqa: E501
    "bad-memory-quantity": (tiny_recipe(stages=[stage(resources={"memory": "lots"})]), "stages[0].resources.memory: 'lots' — String should match pattern"),
    "model-missing": ({"name": "x", "stages": [stage()]}, "model: missing — required"),
    "no-stages": (tiny_recipe(stages=[]), "stages: [] — List should have at least 1 item"),
    "bad-name": (tiny_recipe(name="My Recipe!"), "name: 'My Recipe!' — String should match pattern"),
    "duplicate-stage-names": (tiny_recipe(stages=[stage(), {"name": "gptq", "kind": "evaluate"}]), "stages[1].name: 'gptq' — names must be unique"),
    "quantize-twice": (tiny_recipe(stages=[stage(), stage(name="again")]), "stages[1].kind: 'quantize' — cannot follow quantize stage 'gptq'"),
    "prune-after-quantize": (tiny_recipe(stages=[stage(), {"name": "p", "kind": "prune", "method": "wanda"}]), "stages[1].kind: 'prune' — cannot follow quantize stage"),  # noqa: E501
    "distill-without-teacher": (tiny_recipe(stages=[{"name": "kd", "kind": "distill"}]), "teacher: missing — a distill stage needs a teacher model"),
    "cpu-device-with-gpus": (tiny_recipe(stages=[stage(device="cpu", resources={"gpus": 1})]), "stages[0].device: 'cpu' — resources.gpus is 1"),
    "accelerator-without-gpus": (tiny_recipe(stages=[stage(resources={"accelerator": "nvidia.com/gpu"})]), "accelerator 'nvidia.com/gpu' is set but gpus is 0"),
    "bad-toleration-effect": (tiny_recipe(stages=[stage(resources={"tolerations": [{"key": "gpu", "effect": "Never"}]})]), "stages[0].resources.tolerations[0].effect: 'Never' — Input should be"),  # noqa: E501
    "not-a-mapping": ("- just\n- a list\n", "recipe: 'list' — must be a mapping"),
    "bad-yaml": ("name: x\nstages: [\n", "not valid YAML at line"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_recipe_gets_one_clear_line_and_exit_2(case, write_recipe, capsys):
    recipe, expected = BROKEN[case]
    code = main(["validate", str(write_recipe(copy.deepcopy(recipe)))])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("llmpress: error: ")
    assert expected in lines[0]


def test_several_problems_get_one_line_each(write_recipe, capsys):
    recipe = tiny_recipe(stages=[stage(group_size=7, resources={"gpus": -2})], colour="blue")
    assert main(["validate", str(write_recipe(recipe))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert {line.split(":")[2].strip() for line in lines} == {"colour", "stages[0].group_size", "stages[0].resources.gpus"}


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmpress: error: recipe: ")
    assert "file not found" in err


def test_unknown_cli_flag_is_one_line_exit_2():
    result = run_cli("run", "recipes/demo.yaml", "--fast", cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unrecognized arguments: --fast" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_in_a_subprocess_prints_no_traceback(write_recipe):
    result = run_cli("validate", str(write_recipe(tiny_recipe(stages=[stage(scheme="int3")]))))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.startswith("llmpress: error: stages[0].scheme")


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid(path, capsys):
    assert main(["validate", str(ROOT / "recipes" / path)]) == 0
    assert capsys.readouterr().out.strip() == "ok"


def test_relative_local_paths_resolve_against_the_recipe(write_recipe, tmp_path):
    from llmpress.recipe import load_recipe

    recipe = load_recipe(write_recipe(tiny_recipe(model={"source": "./models/m"})))
    assert recipe.model.source == str((tmp_path / "models" / "m").resolve())


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_stage_config_survives_the_trip_to_its_component(path):
    """The component re-validates the stage JSON: defaults must not come back as settings."""
    import json

    from llmpress.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / path)
    for stage in recipe.stages:
        sent = json.loads(recipe.stage_json(stage))
        stage_type = type(stage)
        again = stage_type.model_validate({k: v for k, v in sent.items() if k in stage_type.model_fields})
        assert again.model_dump(exclude={"resources"}) == stage.model_dump(exclude={"resources"})
