"""The distill step around the stage logic (component layer, called by ``steps.run_stage``):
materialize the teacher and student, give the stage a work folder that survives the
step, log its per-step loss to MLflow, and pick how it runs — in this process, as N
ranks under torchrun (``resources.gpus: N``), or as a TrainJob over M nodes
(``resources.nodes: M``).

Resumability: the work folder holds the checkpoints. With a local ``storage.root`` it is
``<root>/<recipe>/<hash>/<stage>-work`` itself; with an S3 root each checkpoint is
uploaded (atomically, by ``artifacts``) to ``<root>/<recipe>/<hash>/<stage>-checkpoint``
and a rerun of the step downloads it first. Either way a killed step, rerun, resumes.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from llmpress.components import artifacts, tracking
from llmpress.components.data import DataSpec
from llmpress.components.errors import UserError
from llmpress.components.models.io import ModelSpec, check_model_dir, fetch_model
from llmpress.components.stages import distill as distill_stage
from llmpress.components.stages.distill import launch as distill_launch

log = logging.getLogger("llmpress")


def run(model_in: str, model_out: str, stage: dict[str, Any], calibration: DataSpec) -> dict[str, Any]:
    """Run a distill stage; ``stage`` is its JSON plus ``teacher``, ``resources`` and the
    step's ``_context`` (tracking run, storage root, recipe)."""
    from llmpress.components.kubeflow.steps import local_data  # steps imports this module

    fields = {k: v for k, v in stage.items() if k in distill_stage.DistillConfig.model_fields}
    config = distill_stage.DistillConfig.model_validate(fields)
    resources = stage.get("resources") or {}
    context = stage.get("_context") or {}
    nodes, gpus = int(resources.get("nodes") or 1), int(resources.get("gpus") or 0)
    scratch = resources.get("scratch") or {}
    data = local_data(config.data or calibration, "data.calibration" if config.data is None else f"stages.{stage['name']}.data")

    work, checkpoint_uri = _work_dir(context, stage["name"], scratch.get("mount_path") if nodes > 1 else None)
    teacher_dir = _materialize(stage.get("teacher"), work / "teacher", "teacher.source") if stage.get("teacher") else None
    source = config.student.source
    if source == "input":
        student_dir: Path | None = Path(model_in)
    elif source == "teacher":
        student_dir = None
    else:
        student_dir = _materialize({"source": source}, work / "student", f"stages.{stage['name']}.student.source")

    run_id = context.get("run_id")

    def on_log(step: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(run_id, metrics, step=step)

    def on_checkpoint(path: Path) -> None:
        if checkpoint_uri:
            artifacts.put_dir(path, checkpoint_uri)

    if nodes > 1:
        return _multi_node(stage, config, data, model_in, model_out, work, teacher_dir, student_dir, resources, context)
    if gpus > 1:
        return _torchrun(config, data, student_dir, model_out, teacher_dir, work, gpus, on_log, on_checkpoint)
    from llmpress.components.data import load_texts

    return distill_stage.run(student_dir, model_out, config, data, load_texts(data, "data"), teacher_dir, work, on_log, on_checkpoint)


def _work_dir(context: dict[str, Any], stage: str, shared_mount: str | None) -> tuple[Path, str | None]:
    """(local work folder, S3 URI its checkpoints go to or None)."""
    root = context.get("storage") or ""
    recipe = context.get("recipe") or {"name": "llmpress", "hash": "local"}
    key = f"{recipe['name']}/{recipe['hash']}/{stage}"
    if shared_mount:  # every node sees the same folder
        work = Path(shared_mount) / "llmpress-work" / key
    elif root and not artifacts.is_s3(root):
        work = Path(root).expanduser() / f"{key}-work"
    else:
        work = Path(tempfile.mkdtemp(prefix="llmpress-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    if not artifacts.is_s3(root) or shared_mount:
        return work, None
    uri = f"{root.rstrip('/')}/{key}-checkpoint"
    if artifacts.exists(uri):  # an earlier attempt of this step got this far
        landing = work / "checkpoints" / ".download"
        artifacts.get_dir(uri, landing)
        step = json.loads((landing / "trainer_state.json").read_text())["global_step"]
        landing.rename(work / "checkpoints" / f"checkpoint-{step}")
        log.info("restored checkpoint of step %d from %s", step, uri)
    return work, uri


def _materialize(spec: dict[str, Any], dest: Path, field: str) -> Path:
    """A model source as a local safetensors folder (S3 bytes move here, not in the stage)."""
    model = ModelSpec.model_validate(spec)
    if model.kind() == "s3":
        artifacts.get_dir(model.source, dest, plain_ok=True)
        return check_model_dir(dest, field)
    try:
        return fetch_model(model, dest)
    except UserError as err:  # fetch_model names model.source; say which model it was
        raise UserError(*(p.replace("model.source", field, 1) for p in err.problems)) from None


def _write_spec(work: Path, config: Any, data: DataSpec, student_dir: Path | None, out_dir: str | Path, teacher_dir: Path | None) -> Path:
    spec = distill_launch.WorkerSpec(
        student_dir=str(student_dir) if student_dir else None, out_dir=str(out_dir), teacher_dir=str(teacher_dir) if teacher_dir else None,
        work_dir=str(work), config=config.model_dump(mode="json"), data=data.model_dump(mode="json"),
    )
    path = work / "spec.json"
    path.write_text(spec.model_dump_json(indent=2))
    (work / "metrics.json").unlink(missing_ok=True)
    return path


def _torchrun(config: Any, data: DataSpec, student_dir: Path | None, model_out: str, teacher_dir: Path | None, work: Path,
              gpus: int, on_log: Any, on_checkpoint: Any) -> dict[str, Any]:
    """N ranks in this pod; rank 0's progress file is tailed into MLflow as it grows."""
    spec = _write_spec(work, config, data, student_dir, model_out, teacher_dir)
    progress = work / "progress.jsonl"
    done = threading.Event()
    seen = sum(1 for _ in progress.open()) if progress.exists() else 0
    tail = threading.Thread(target=_tail, args=(progress, seen, done, on_log), daemon=True)
    tail.start()
    command = distill_launch.torchrun_command(spec, gpus)
    log.info("launching %d ranks: %s", gpus, " ".join(command))
    errors = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout or []:
            if line.startswith("llmpress: error: "):
                errors.append(line.removeprefix("llmpress: error: ").rstrip())
            else:
                sys.stdout.write(line)
    done.set()
    tail.join()
    if errors:
        raise UserError(*errors)
    if proc.returncode:
        raise RuntimeError(f"distill ranks failed with exit code {proc.returncode} (output above)")
    _checkpoints_to(work, on_checkpoint)
    return json.loads((work / "metrics.json").read_text())


def _tail(progress: Path, seen: int, done: threading.Event, on_log: Any) -> None:
    while True:
        finished = done.wait(5)
        if progress.exists():
            lines = progress.read_text().splitlines()
            for line in lines[seen:]:
                record = json.loads(line)
                on_log(record.pop("step"), record)
            seen = len(lines)
        if finished:
            return


def _checkpoints_to(work: Path, on_checkpoint: Any) -> None:
    """The last checkpoint of a torchrun run, synced once at the end (ranks cannot call back)."""
    from llmpress.components.stages.distill.train import last_checkpoint

    path, _ = last_checkpoint(work / "checkpoints")
    if path:
        on_checkpoint(Path(path))


def _multi_node(stage: dict[str, Any], config: Any, data: DataSpec, model_in: str, model_out: str, work: Path, teacher_dir: Path | None,
                student_dir: Path | None, resources: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """A TrainJob over the shared claim: inputs copied onto it, output copied back."""
    from llmpress.components.kubeflow import trainjob

    if student_dir == Path(model_in):  # the step's input lives in this pod only
        student_dir = work / "student"
        if not student_dir.exists():
            shutil.copytree(model_in, student_dir)
    if not data.source.startswith(("builtin:", "hf:")):
        shutil.copy2(data.source, work / Path(data.source).name)
        data = data.model_copy(update={"source": str(work / Path(data.source).name)})
    out = work / "out"
    spec = _write_spec(work, config, data, student_dir, out, teacher_dir)
    recipe = context.get("recipe") or {"name": "llmpress", "hash": "local"}
    manifest = distill_launch.trainjob_manifest(
        name=f"{recipe['name']}-{stage['name']}-{recipe['hash'][:8]}", image=stage.get("image") or context.get("image") or "",
        spec_path=str(spec), nodes=int(resources["nodes"]), gpus_per_node=int(resources.get("gpus") or 0),
        pvc=resources["scratch"]["pvc"], mount_path=resources["scratch"]["mount_path"],
        accelerator=resources.get("accelerator") or "nvidia.com/gpu", cpu=resources.get("cpu"), memory=resources.get("memory"),
        node_selector=resources.get("node_selector"), tolerations=resources.get("tolerations"), shm=resources.get("shm"),
    )
    if not manifest["spec"]["trainer"]["image"]:
        raise UserError.field("image", None, "a multi-node distill stage needs the image its nodes run: set image or cluster.gpu_image")
    trainjob.submit_and_wait(manifest)
    if Path(model_out).exists():
        shutil.rmtree(model_out)
    shutil.copytree(out, model_out)
    return json.loads((work / "metrics.json").read_text())
