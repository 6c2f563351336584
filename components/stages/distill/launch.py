"""How the distill stage runs on more than one process.

One process: ``distill.run()`` in the step's own process. ``resources.gpus: N > 1`` on
one node: ``torchrun --nproc-per-node N`` runs this module's worker N times in the pod
(DeepSpeed/DDP ranks). ``resources.nodes: M > 1``: a Kubeflow Trainer ``TrainJob``
(``trainer.kubeflow.org/v1alpha1``, the ``torch-distributed`` runtime) runs the same
worker on M nodes; ``trainjob_manifest`` builds it and the component layer submits it.

Every process reads one JSON *spec* (a file written by the component): where the
student, teacher, data and output are, the work folder, and the stage's config.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

WORKER_MODULE = "llmpress.components.stages.distill.launch"
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs
CONTAINER = "node"  # that runtime's replicated job and container name


class WorkerSpec(BaseModel):
    """Everything a worker process needs, as files it can read."""

    model_config = ConfigDict(extra="forbid")

    student_dir: str | None
    out_dir: str
    teacher_dir: str | None
    work_dir: str
    config: dict[str, Any]
    data: dict[str, Any]


def torchrun_command(spec_path: str | Path, nproc: int) -> list[str]:
    """N ranks of the worker on this node (``python -m torch.distributed.run`` is torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", WORKER_MODULE, str(spec_path)]


def trainjob_manifest(
    name: str,
    image: str,
    spec_path: str,
    nodes: int,
    gpus_per_node: int,
    pvc: str,
    mount_path: str,
    namespace: str | None = None,
    accelerator: str = "nvidia.com/gpu",
    cpu: str | None = None,
    memory: str | None = None,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    shm: str | None = None,
) -> dict[str, Any]:
    """A TrainJob that runs the worker on ``nodes`` nodes, ``gpus_per_node`` ranks each.

    The runtime starts the trainer container on every node with the PET_* variables
    (node rank, master address) that torchrun reads; the spec, the inputs and the work
    folder live on ``pvc`` (ReadWriteMany), mounted at the same path as in the step."""
    procs = max(gpus_per_node, 1)
    limits: dict[str, str] = {}
    if gpus_per_node:
        limits[accelerator] = str(gpus_per_node)
    if cpu:
        limits["cpu"] = cpu
    if memory:
        limits["memory"] = memory
    volumes: list[dict[str, Any]] = [{"name": "llmpress-work", "persistentVolumeClaim": {"claimName": pvc}}]
    mounts: list[dict[str, Any]] = [{"name": "llmpress-work", "mountPath": mount_path}]
    if procs > 1 or shm:  # NCCL and the data loader's workers share memory through /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", **({"sizeLimit": shm} if shm else {})}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    pod_spec: dict[str, Any] = {"volumes": volumes, "containers": [{"name": CONTAINER, "volumeMounts": mounts}]}
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [{k: v for k, v in t.items() if v is not None} for t in tolerations]
    metadata: dict[str, Any] = {"name": job_name(name), "labels": {"app.kubernetes.io/managed-by": "llmpress"}}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"name": RUNTIME, "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": image,
                "command": ["torchrun", "-m", WORKER_MODULE, spec_path],
                "numNodes": nodes,
                "numProcPerNode": procs,
                "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "NCCL_NVLS_ENABLE", "value": "0"}],
                **({"resourcesPerNode": {"limits": limits, "requests": dict(limits)}} if limits else {}),
            },
            "runtimePatches": [{
                "manager": "llmpress",
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                    {"name": CONTAINER, "template": {"spec": {"template": {"spec": pod_spec}}}},
                ]}}},
            }],
        },
    }


def job_name(name: str) -> str:
    """A valid DNS-1035 name (TrainJob names become Service names): <= 63, [a-z0-9-]."""
    clean = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not clean or not clean[0].isalpha():
        clean = f"j-{clean}"
    return clean[:63].rstrip("-")


def main(argv: list[str] | None = None) -> int:
    """Worker: ``python -m llmpress.components.stages.distill.launch SPEC.json``."""
    import logging

    from llmpress.components.data import DataSpec, load_texts
    from llmpress.components.errors import UserError
    from llmpress.components.stages import distill

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {WORKER_MODULE} SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rank = int(os.environ.get("RANK", "0"))
    try:
        spec = WorkerSpec.model_validate_json(Path(args[0]).read_text())
        config = distill.DistillConfig.model_validate(spec.config)
        data = DataSpec.model_validate(spec.data)
        metrics = distill.run(spec.student_dir, spec.out_dir, config, data, load_texts(data, "data"), spec.teacher_dir, spec.work_dir)
    except UserError as err:
        if rank == 0:
            for line in err.problems:
                print(f"llmpress: error: {line}", flush=True)
        return 2
    if rank == 0:
        (Path(spec.work_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
