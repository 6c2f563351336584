"""The cluster side of a compiled pipeline: a 3-stage GPU recipe carries its node
selectors, tolerations, limits, /dev/shm, scratch volumes, Secret/ConfigMap env and a
non-root security context in the KFP platform spec; `compile --k8s` writes Kubeflow's
Pipeline/PipelineVersion resources; no credential ever lands in the output."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from conftest import run_cli, tiny_recipe

CANARY = "canary-S3cr3t-do-not-print"
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
THREE_STAGES = [
    {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16",
     "resources": {"gpus": 4, "cpu": "32", "memory": "256Gi", "shm": "32Gi", "node_selector": H100, "tolerations": [GPU_TAINT],
                   "scratch": {"size": "1Ti", "storage_class": "fast-nvme"}}},
    {"name": "eval-gpu", "kind": "evaluate",
     "resources": {"gpus": 1, "memory": "64Gi", "node_selector": H100, "tolerations": [GPU_TAINT], "scratch": {"pvc": "model-cache", "mount_path": "/models"}}},
    {"name": "eval-cpu", "kind": "evaluate", "resources": {"cpu": "8", "memory": "32Gi", "node_selector": {"node-pool": "cpu"}}},
]
CLUSTER = {"s3_secret": "team-s3", "mlflow_secret": "team-mlflow", "config_map": "team-env", "image_pull_secrets": ["pull"],
           "gpu_image": "reg.example.com/llmpress-cuda:1.2.3", "cpu_image": "reg.example.com/llmpress-cpu:1.2.3"}


def compiled(tmp_path, **overrides: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    from llmpress.pipeline import compile_recipe
    from llmpress.recipe import parse_recipe

    out = compile_recipe(parse_recipe(tiny_recipe(**overrides)), tmp_path / "p.yaml")
    text = out.read_text()
    spec, platform = list(yaml.safe_load_all(text))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], text


@pytest.fixture
def three_stage(tmp_path):
    return compiled(tmp_path, stages=THREE_STAGES, cluster=CLUSTER)


def by_task(spec: dict[str, Any], display: str) -> str:
    """The executor name of the task shown as ``display``."""
    for task in spec["root"]["dag"]["tasks"].values():
        if task["taskInfo"]["name"] == display:
            return spec["components"][task["componentRef"]["name"]]["executorLabel"]
    raise KeyError(display)


def test_gpu_stage_gets_accelerators_limits_selector_and_toleration(three_stage):
    spec, k8s, _ = three_stage
    ex = by_task(spec, "gptq")
    res = spec["deploymentSpec"]["executors"][ex]["container"]["resources"]
    assert (res["accelerator"]["resourceType"], res["accelerator"]["resourceCount"]) == ("nvidia.com/gpu", "4")
    assert res["resourceCpuLimit"] == res["resourceCpuRequest"] == "32"
    assert res["resourceMemoryLimit"] == res["resourceMemoryRequest"] == "256Gi"
    assert k8s[ex]["nodeSelector"]["labels"] == H100
    assert k8s[ex]["tolerations"] == [GPU_TAINT]


def test_multi_gpu_stage_gets_a_ram_backed_dev_shm_and_an_ephemeral_scratch_volume(three_stage):
    spec, k8s, _ = three_stage
    ex = by_task(spec, "gptq")
    assert k8s[ex]["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "32Gi"}]
    (volume,) = k8s[ex]["genericEphemeralVolume"]
    assert (volume["mountPath"], volume["size"], volume["storageClassName"], volume["accessModes"]) == ("/scratch", "1Ti", "fast-nvme", ["ReadWriteOnce"])


def test_single_gpu_step_mounts_its_pvc_and_no_shm(three_stage):
    spec, k8s, _ = three_stage
    ex = by_task(spec, "evaluate-eval-gpu")
    assert k8s[ex]["pvcMount"][0]["mountPath"] == "/models"
    assert k8s[ex]["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "model-cache"
    assert "emptyDirMounts" not in k8s[ex]


def test_cpu_steps_run_the_cpu_image_on_the_cpu_pool_and_gpu_steps_the_cuda_image(three_stage):
    spec, k8s, _ = three_stage
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert images[by_task(spec, "gptq")] == images[by_task(spec, "evaluate-eval-gpu")] == CLUSTER["gpu_image"]
    for display in ("validate-recipe", "run-parameters", "import-model", "evaluate-baseline", "evaluate-eval-cpu", "report"):
        assert images[by_task(spec, display)] == CLUSTER["cpu_image"], display
    assert k8s[by_task(spec, "evaluate-eval-cpu")]["nodeSelector"]["labels"] == {"node-pool": "cpu"}
    assert "accelerator" not in spec["deploymentSpec"]["executors"][by_task(spec, "evaluate-eval-cpu")]["container"].get("resources", {})


def test_every_step_reads_s3_and_mlflow_secrets_by_name_and_runs_as_non_root(three_stage):
    spec, k8s, _ = three_stage
    assert len(k8s) == len(spec["deploymentSpec"]["executors"]) == 9  # validate-recipe, run-parameters, import, 5 steps, report
    for name, ex in k8s.items():
        secrets = {s["secretName"]: s for s in ex["secretAsEnv"]}
        assert [k["envVar"] for k in secrets["team-s3"]["keyToEnv"]] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"], name
        assert secrets["team-s3"]["optional"] is False and secrets["team-mlflow"]["optional"] is True
        assert ex["configMapAsEnv"][0]["configMapName"] == "team-env"
        assert [k["envVar"] for k in ex["configMapAsEnv"][0]["keyToEnv"]][0] == "MLFLOW_TRACKING_URI"
        assert ex["imagePullSecret"] == [{"secretName": "pull", "secretNameParameter": {"runtimeValue": {"constant": "pull"}}}]
        assert ex["securityContext"] == {"runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}
        assert ex["fieldPathAsEnv"] == [{"name": "KFP_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"}], name


def test_a_scratch_volume_is_where_steps_stage_the_models_they_move(three_stage):
    spec, _, _ = three_stage
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"][by_task(spec, "gptq")]["container"].get("env", [])}
    assert env == {"LLMPRESS_SCRATCH": "/scratch"}
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"][by_task(spec, "evaluate-eval-gpu")]["container"].get("env", [])}
    assert env == {"LLMPRESS_SCRATCH": "/models"}


def test_a_recipe_for_irsa_sends_no_s3_secret(tmp_path):
    _, k8s, _ = compiled(tmp_path, cluster={"s3_secret": None})
    assert all({s["secretName"] for s in ex["secretAsEnv"]} == {"llmpress-mlflow"} for ex in k8s.values())


def test_no_credential_from_the_environment_enters_the_compiled_pipeline(tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(key, CANARY)
    _, _, text = compiled(tmp_path, stages=THREE_STAGES, cluster=CLUSTER)
    assert CANARY not in text


@pytest.mark.parametrize(("resources", "line"), [
    ({"gpus": 1, "scratch": {}}, "stages[0].resources.scratch: {} — scratch needs exactly one of size (a new volume per pod) or pvc (an existing claim)"),
    ({"gpus": 1, "scratch": {"pvc": "x", "storage_class": "y"}},
     "stages[0].resources.scratch: {'pvc': 'x', 'storage_class': 'y'} — scratch.storage_class applies to a new volume; set size, or drop storage_class"),
    ({"gpus": 2, "shm": "lots"}, "stages[0].resources.shm: 'lots' — String should match pattern '^[0-9]+(\\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|K|M|G|T)?$'"),
])
def test_bad_cluster_resources_are_one_line_each(resources, line):
    from llmpress.components.errors import UserError
    from llmpress.recipe import parse_recipe

    stage = {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16", "resources": resources}
    with pytest.raises(UserError) as err:
        parse_recipe(tiny_recipe(stages=[stage]))
    assert err.value.problems == [line]


def test_a_secret_name_that_is_not_a_kubernetes_name_is_refused():
    from llmpress.components.errors import UserError
    from llmpress.recipe import parse_recipe

    with pytest.raises(UserError) as err:
        parse_recipe(tiny_recipe(cluster={"s3_secret": "AKIA/not a name"}))
    assert err.value.problems[0].startswith("cluster.s3_secret: 'AKIA/not a name' — String should match pattern")


def test_defaults_fill_only_what_the_recipe_leaves_out():
    from llmpress.cluster import with_defaults

    recipe = tiny_recipe(stages=[{"name": "a", "kind": "quantize", "scheme": "gptq-w4a16"},
                                 {"name": "b", "kind": "evaluate", "resources": {"gpus": 1}}], cluster={"s3_secret": "mine"})
    defaults = {"resources": {"quantize": {"gpus": 1, "node_selector": H100}, "evaluate": {"cpu": "4"}},
                "cluster": {"s3_secret": "chart-s3", "config_map": "chart-env"}, "storage": {"root": "s3://b/runs"}}
    out = with_defaults(recipe, defaults)
    assert out["stages"][0]["resources"] == {"gpus": 1, "node_selector": H100}
    assert out["stages"][1]["resources"] == {"gpus": 1}  # the recipe's own block, whole
    assert out["evaluation"]["resources"] == {"cpu": "4"}
    assert out["cluster"] == {"s3_secret": "mine", "config_map": "chart-env"}
    assert out["storage"] == {"root": "s3://b/runs"}
    assert recipe["stages"][0].get("resources") is None  # the input is left alone


def test_a_defaults_file_with_an_unknown_kind_is_one_line(write_recipe, tmp_path):
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("resources:\n  quantise: {gpus: 1}\n")
    result = run_cli("compile", str(write_recipe(tiny_recipe())), "-o", str(tmp_path / "p.yaml"), "--defaults", str(defaults))
    assert result.returncode == 2
    assert result.stderr.strip() == "llmpress: error: defaults.resources: 'quantise' — allowed kinds: distill, prune, quantize, evaluate"


def test_compile_k8s_writes_pipeline_and_version_resources(write_recipe, tmp_path):
    out = tmp_path / "k8s.yaml"
    result = run_cli("compile", str(write_recipe(tiny_recipe(stages=THREE_STAGES))), "-o", str(out), "--k8s", "--version", "1.2.3", "--namespace", "team-ml")
    assert result.returncode == 0, result.stderr
    pipeline, version = list(yaml.safe_load_all(out.read_text()))
    assert (pipeline["apiVersion"], pipeline["kind"]) == ("pipelines.kubeflow.org/v2beta1", "Pipeline")
    assert pipeline["metadata"] == {"name": "tiny-gptq", "namespace": "team-ml"}
    assert (version["kind"], version["metadata"]["name"], version["spec"]["pipelineName"]) == ("PipelineVersion", "tiny-gptq-1.2.3", "tiny-gptq")
    assert version["spec"]["pipelineSpec"]["pipelineInfo"]["name"] == "tiny-gptq"
    executors = version["spec"]["platformSpec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert any(e.get("emptyDirMounts") for e in executors.values())


def test_compile_k8s_refuses_a_version_that_cannot_be_a_name(write_recipe, tmp_path):
    result = run_cli("compile", str(write_recipe(tiny_recipe())), "-o", str(tmp_path / "k.yaml"), "--k8s", "--version", "1.0 beta")
    assert result.returncode == 2
    assert result.stderr.strip() == "llmpress: error: --version: '1.0 beta' — letters, digits, '.', '_' and '-', at most 63"
