"""`llmpress compile`: KFP IR YAML that kfp's own loader accepts, GPU placement included."""

from __future__ import annotations

import yaml
from conftest import model_steps, run_cli, tiny_recipe

GPU_STAGE = {
    "name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16",
    "resources": {
        "gpus": 2, "accelerator": "nvidia.com/gpu", "cpu": "8", "memory": "64Gi",
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


def compile_recipe(write_recipe, tmp_path, recipe):
    out = tmp_path / "pipeline.yaml"
    result = run_cli("compile", str(write_recipe(recipe)), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_compiled_yaml_loads_with_kfp(write_recipe, tmp_path):
    from kfp import components

    out = compile_recipe(write_recipe, tmp_path, tiny_recipe())
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "tiny-gptq"


def test_gpu_stage_carries_accelerator_selector_and_toleration(write_recipe, tmp_path):
    out = compile_recipe(write_recipe, tmp_path, tiny_recipe(stages=[GPU_STAGE]))
    docs = list(yaml.safe_load_all(out.read_text()))
    spec, platform = docs[0], docs[1]
    (executor,) = [e for name, e in spec["deploymentSpec"]["executors"].items() if name.startswith("exec-run-stage")]
    res = executor["container"]["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert res["accelerator"]["resourceCount"] == "2"
    assert res["memoryLimit"] == 68.719476736 or res["resourceMemoryLimit"] == "64Gi"
    (step,) = model_steps(tiny_recipe(stages=[GPU_STAGE]))
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][f"exec-{step}"]
    assert k8s["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    text = out.read_text()
    assert "nvidia.com/gpu" in text


def test_pipeline_has_import_baseline_stage_evaluation_and_report(write_recipe, tmp_path):
    out = compile_recipe(write_recipe, tmp_path, tiny_recipe())
    spec = next(yaml.safe_load_all(out.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    names = {t["taskInfo"]["name"] for t in tasks.values()}
    assert names == {"validate-recipe", "run-parameters", "import-model", "evaluate-baseline", "gptq", "evaluate-gptq", "report"}
    # the effective recipe (recipe + run parameters) is validated before anything starts;
    # the stage needs only the imported model (not the baseline evaluation: editing the
    # evaluation settings must not redo it, and on a cluster the two run side by side);
    # the stage's evaluation needs the stage's model and the baseline's figures; the
    # report needs both chains of records and the fields the run parameters changed
    assert "dependentTasks" not in tasks["validate-recipe"]
    # the run's parameters page follows validation whatever its outcome, to say why it failed
    assert tasks["run-parameters"]["dependentTasks"] == ["validate-recipe"]
    assert tasks["run-parameters"]["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    assert sorted(tasks["import-model"]["dependentTasks"]) == ["validate-recipe"]
    (step,) = model_steps(tiny_recipe())
    assert sorted(tasks[step]["dependentTasks"]) == ["import-model"]
    assert sorted(tasks["evaluate-2"]["dependentTasks"]) == ["evaluate", step]
    assert sorted(tasks["finish"]["dependentTasks"]) == ["evaluate-2", step, "validate-recipe"]


def test_a_kind_that_is_not_built_is_refused_before_compiling(write_recipe, tmp_path, monkeypatch, capsys):
    from llmpress.cli import main
    from llmpress.components.kubeflow import steps

    # simulate a release in which only quantize and evaluate exist
    monkeypatch.setattr(steps, "BUILT_KINDS", ("quantize", "evaluate"))
    recipe = tiny_recipe(stages=[{"name": "p", "kind": "prune", "method": "wanda"}])
    assert main(["compile", str(write_recipe(recipe)), "-o", str(tmp_path / "p.yaml")]) == 2
    assert capsys.readouterr().err.strip() == "llmpress: error: stages[0].kind: 'prune' — not built yet in this version; built: quantize, evaluate"
    assert not (tmp_path / "p.yaml").exists()


def test_editing_a_later_stage_leaves_what_kfp_caches_earlier_steps_by_unchanged(tmp_path):
    """KFP's cache key on a cluster is built from a task's component, container and input
    values: for every step before the edited stage they must be byte-for-byte the same."""
    from llmpress.pipeline import compile_recipe as compile_to
    from llmpress.recipe import parse_recipe

    stages = [{"name": "wanda", "kind": "prune", "method": "wanda", "sparsity": 0.3},
              {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16", "group_size": 64}]
    first = next(yaml.safe_load_all(compile_to(parse_recipe(tiny_recipe(stages=stages)), tmp_path / "a.yaml").read_text()))
    stages[1]["group_size"] = 32
    second = next(yaml.safe_load_all(compile_to(parse_recipe(tiny_recipe(stages=stages, description="edited")), tmp_path / "b.yaml").read_text()))

    def cache_material(spec: dict, display: str) -> tuple:
        (t,) = [t for t in spec["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == display]
        component = spec["components"][t["componentRef"]["name"]]
        return t["inputs"], component["inputDefinitions"], spec["deploymentSpec"]["executors"][component["executorLabel"]]

    for display in ("import-model", "evaluate-baseline", "wanda", "evaluate-wanda"):
        assert cache_material(first, display) == cache_material(second, display), display
    for display in ("gptq", "report"):
        assert cache_material(first, display) != cache_material(second, display), display
