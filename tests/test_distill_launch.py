"""The multi-node TrainJob manifest, validated against published schemas:

- the TrainJob itself against the Kubeflow Trainer API (pip ``kubeflow-trainer-api==2.3.0``:
  the models its maintainers generate from the Trainer's OpenAPI spec). Parsing checks
  types and required fields; a lossless round trip checks that no field is unknown
  (the models drop unknown keys, as the API server's strict field validation rejects them);
- the pod it becomes (image, command, resources, volumes, mounts, node selector,
  tolerations) against the Kubernetes 1.37 JSON schema (pip ``kubernetes-validate``, strict).
"""

from __future__ import annotations

import copy
import json

import pytest
from llmpress.components.stages.distill.launch import CONTAINER, WORKER_MODULE, job_name, torchrun_command, trainjob_manifest

TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "value": None}


def manifest(**overrides):
    args = dict(
        name="distill-llama-kd", image="ghcr.io/llmpress/llmpress-cuda:0.1.0", spec_path="/scratch/llmpress-work/r/h/kd/spec.json",
        nodes=4, gpus_per_node=8, pvc="llmpress-work", mount_path="/scratch", namespace="ml", cpu="64", memory="512Gi",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, tolerations=[TOLERATION], shm="64Gi",
    )
    args.update(overrides)
    return trainjob_manifest(**args)


def trainer_api_problems(doc: dict) -> list[str]:
    """Problems the Trainer API finds: a parse error, or fields it does not know."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    try:
        parsed = TrainerV1alpha1TrainJob.from_dict(copy.deepcopy(doc))
    except ValidationError as err:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    back = parsed.to_dict()
    return [] if back == doc else [f"not a lossless round trip: {_first_difference(doc, back)}"]


def _first_difference(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {a!r} became {b!r}"


def as_pod(doc: dict) -> dict:
    """The trainer node's pod as the runtime assembles it from the TrainJob."""
    trainer = doc["spec"]["trainer"]
    patch = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    container = {"name": CONTAINER, "image": trainer["image"], "command": trainer["command"], "env": trainer["env"],
                 "resources": trainer.get("resourcesPerNode", {}), "volumeMounts": patch["containers"][0]["volumeMounts"]}
    spec = {"containers": [container], **{k: v for k, v in patch.items() if k != "containers"}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]}, "spec": spec}


def test_trainjob_manifest_validates_against_the_trainer_api():
    assert trainer_api_problems(manifest()) == []


def test_the_trainer_api_check_catches_unknown_and_mistyped_fields():
    misspelled = manifest()
    misspelled["spec"]["trainer"]["numNode"] = misspelled["spec"]["trainer"].pop("numNodes")
    mistyped = manifest()
    mistyped["spec"]["trainer"]["numNodes"] = "4"
    no_runtime = manifest()
    del no_runtime["spec"]["runtimeRef"]
    for bad in (misspelled, mistyped, no_runtime):
        assert trainer_api_problems(bad), json.dumps(bad["spec"]["trainer"])


def test_trainjob_node_pod_validates_against_the_kubernetes_schema():
    import kubernetes_validate

    kubernetes_validate.validate(as_pod(manifest()), "1.37", strict=True)
    broken = as_pod(manifest())
    broken["spec"]["volumes"][0]["persistentVolumeClaim"]["claim"] = "oops"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37", strict=True)


def test_trainjob_runs_the_worker_on_every_node_with_one_rank_per_gpu():
    doc = manifest(nodes=3, gpus_per_node=4)
    trainer = doc["spec"]["trainer"]
    assert (doc["apiVersion"], doc["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert doc["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    assert trainer["command"] == ["torchrun", "-m", WORKER_MODULE, "/scratch/llmpress-work/r/h/kd/spec.json"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"name": "NCCL_NVLS_ENABLE", "value": "0"} in trainer["env"]
    pod = as_pod(doc)["spec"]
    assert {"name": "llmpress-work", "persistentVolumeClaim": {"claimName": "llmpress-work"}} in pod["volumes"]
    assert {"name": "llmpress-work", "mountPath": "/scratch"} in pod["containers"][0]["volumeMounts"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_cpu_only_job_has_no_gpu_limit_and_still_validates():
    doc = manifest(gpus_per_node=0, cpu=None, memory=None, shm=None, node_selector=None, tolerations=None)
    assert "resourcesPerNode" not in doc["spec"]["trainer"]
    assert doc["spec"]["trainer"]["numProcPerNode"] == 1
    assert trainer_api_problems(doc) == []


def test_job_names_are_valid_dns_labels():
    assert job_name("Demo_KD.stage--1") == "demo-kd-stage--1"
    assert job_name("7b-distill") == "j-7b-distill"
    assert len(job_name("a" * 100)) == 63


def test_torchrun_command_starts_n_ranks_of_the_worker():
    command = torchrun_command("/w/spec.json", 2)
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=2" in command and command[-3:] == ["-m", WORKER_MODULE, "/w/spec.json"]
