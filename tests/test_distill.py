"""The distill stage on CPU with the tiny builtin Llama as teacher and a smaller student
derived from it (same tokenizer): what KD buys, resuming after a kill, the teacher
cache, the student sources, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llmpress.components.data import DataSpec, load_texts
from llmpress.components.errors import UserError

# A student with half the width and one layer: it starts from random weights, so the
# teacher's soft targets have a lot to teach it in a few dozen steps.
SMALL = {"source": "teacher", "num_layers": 1, "hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 2}
TRAIN = DataSpec(source="builtin:pydoc-train", num_samples=16, seq_len=64)
HELD_OUT = DataSpec(source="builtin:pydoc-eval", num_samples=32, seq_len=64)


def config(**overrides):
    from llmpress.components.stages.distill import DistillConfig

    base = dict(alpha=0.9, temperature=1.0, steps=60, learning_rate=3e-3, batch_size=8, warmup_ratio=0.1,
                student=SMALL, gradient_checkpointing=False, save_every=1000, device="cpu")
    base.update(overrides)
    return DistillConfig.model_validate(base)


def distill(teacher: Path, tmp: Path, name: str, student_dir: Path | None = None, data: DataSpec = TRAIN, **overrides) -> tuple[Path, dict]:
    from llmpress.components.stages import distill as stage

    out = tmp / f"{name}-out"
    metrics = stage.run(student_dir, out, config(**overrides), data, load_texts(data), teacher, tmp / f"{name}-work")
    return out, metrics


def held_out_perplexity(model_dir: Path) -> float:
    from llmpress.components.stages import evaluate

    return evaluate.run(model_dir, evaluate.EvaluateConfig(device="cpu"), HELD_OUT, load_texts(HELD_OUT))["perplexity"]


def worker(spec: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmpress.components.stages.distill.launch", str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def write_spec(path: Path, teacher: Path | None, work: Path, out: Path, student_dir: Path | None = None, **overrides) -> Path:
    spec = {"student_dir": str(student_dir) if student_dir else None, "out_dir": str(out), "teacher_dir": str(teacher) if teacher else None,
            "work_dir": str(work), "config": config(**overrides).model_dump(mode="json"), "data": TRAIN.model_dump(mode="json")}
    path.write_text(json.dumps(spec))
    return path


def test_kd_student_beats_the_same_student_trained_on_labels_alone(tiny_model_dir, tmp_path):
    kd_out, kd = distill(tiny_model_dir, tmp_path, "kd", alpha=0.9)
    ce_out, ce = distill(tiny_model_dir, tmp_path, "ce", alpha=0.0)
    kd_ppl, ce_ppl = held_out_perplexity(kd_out), held_out_perplexity(ce_out)
    # same steps, data, seed and initial weights: only the loss differs
    assert kd["steps"] == ce["steps"] == 60 and kd["num_parameters"] == ce["num_parameters"]
    assert kd_ppl < 0.95 * ce_ppl, (kd_ppl, ce_ppl)


def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    spec = write_spec(tmp_path / "spec.json", tiny_model_dir, work, out, steps=40, save_every=10, learning_rate=1e-3)
    first = worker(spec)
    deadline = time.time() + 240
    while not list((work / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert first.poll() is None, first.communicate()[0][-2000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # no chance to clean up, as when a node dies
    first.wait()
    assert not out.exists()
    killed_at = max(json.loads(line)["step"] for line in (work / "progress.jsonl").read_text().splitlines())
    assert killed_at < 40

    second = worker(spec)
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 0, log[-3000:]
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 10 and metrics["resumed_from_step"] % 10 == 0
    assert f"resuming from {work / 'checkpoints'}/checkpoint-{metrics['resumed_from_step']}" in log
    steps = [json.loads(line)["step"] for line in (work / "progress.jsonl").read_text().splitlines()]
    resumed = steps[steps.index(killed_at) + 1 :] if killed_at in steps else steps
    assert resumed[0] == metrics["resumed_from_step"] + 1 and resumed[-1] == 40  # continued, did not start over
    assert (out / "config.json").is_file()


def test_tokenizer_mismatch_is_one_clear_line(tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer

    student = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, student)
    tok = Tokenizer.from_file(str(student / "tokenizer.json"))
    tok.add_tokens(["<|a-token-the-teacher-lacks|>"])
    tok.save(str(student / "tokenizer.json"))
    spec = write_spec(tmp_path / "spec.json", tiny_model_dir, tmp_path / "work", tmp_path / "out", student_dir=student,
                      student={"source": str(student)})
    proc = worker(spec)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("llmpress: error:")]
    assert errors == [f"llmpress: error: student.source: {str(student)!r} — its tokenizer differs from the teacher's "
                      "(1025 tokens vs the teacher's 1024); teacher and student must share a tokenizer"]
    assert "Traceback" not in output


def test_training_from_the_teacher_cache_matches_the_online_teacher_without_loading_it(tiny_model_dir, tmp_path):
    _, online = distill(tiny_model_dir, tmp_path, "online", steps=4, top_k=32)
    _, cached = distill(tiny_model_dir, tmp_path, "cached", steps=4, top_k=32, teacher_cache=True)
    assert online["teacher_loaded_during_training"] == 1 and cached["teacher_loaded_during_training"] == 0
    payload = 16 * 64 * 32 * (2 + 4)  # windows x positions x k x (bf16 value + int32 token id)
    assert payload <= cached["teacher_cache_bytes"] < payload + 4096  # plus the safetensors header
    # the cache keeps logits in bf16: the losses agree to bf16's precision
    assert cached["train_loss_last"] == pytest.approx(online["train_loss_last"], rel=2e-2)
    cache_file = next((tmp_path / "cached-work" / "teacher-cache").glob("*/teacher-topk.safetensors"))
    built = cache_file.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "cached-work" / "checkpoints")  # a second student, same teacher and data
    _, again = distill(tiny_model_dir, tmp_path, "cached", steps=4, top_k=32, teacher_cache=True)
    assert "teacher_cache_build_s" not in again and cache_file.stat().st_mtime_ns == built  # reused, not rebuilt


def test_derived_student_keeps_evenly_spaced_teacher_layers(tiny_model_dir):
    import torch
    from llmpress.components.stages.distill.student import derive_student, kept_layers
    from transformers import AutoModelForCausalLM

    assert kept_layers(32, 4) == [0, 10, 21, 31] and kept_layers(4, 1) == [3]
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    student, init = derive_student(teacher, {"num_layers": 1}, seed=0)
    assert init == "teacher-layers:1" and student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.0.mlp.up_proj.weight"], t["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])


def test_student_from_an_earlier_stage_output_is_trained_in_place(tiny_model_dir, tmp_path):
    out, metrics = distill(tiny_model_dir, tmp_path, "recover", student_dir=tiny_model_dir, student={"source": "input"}, steps=2, alpha=0.5)
    assert metrics["num_parameters"] == metrics["teacher_num_parameters"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["dtype"] == "bfloat16"  # saved as its source was


def test_qat_saves_weights_on_the_quantization_grid(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    out, _ = distill(tiny_model_dir, tmp_path, "qat", student_dir=tiny_model_dir, student={"source": "input"}, steps=2,
                     finetune="qat", qat={"bits": 4, "group_size": 128}, learning_rate=1e-2)
    weights = load_file(str(next(out.glob("*.safetensors"))))
    w = weights["model.layers.0.mlp.down_proj.weight"].float()  # [128, 384]: 3 groups of 128 per row
    groups = w.reshape(w.shape[0], -1, 128)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 7
    levels = groups / scale
    assert torch.allclose(levels, levels.round(), atol=0.05)  # int4 levels, up to bf16 rounding


def test_qlora_refuses_clearly_on_cpu(tiny_model_dir, tmp_path):
    with pytest.raises(UserError) as err:
        distill(tiny_model_dir, tmp_path, "qlora", student_dir=tiny_model_dir, student={"source": "input"}, finetune="qlora", steps=1)
    assert err.value.problems == ["finetune: 'qlora' — needs a CUDA GPU (bitsandbytes 4-bit kernels); this process has none "
                                  "— use finetune: full or qat on CPU"]


@pytest.mark.parametrize("fields,problem", [
    ({"teacher_cache": True}, "set top_k"),
    ({"student": {"source": "input", "num_layers": 2}}, "set student.source: teacher"),
    ({"finetune": "qlora", "deepspeed": "zero3"}, "trains with DDP"),
    ({"alpha": 0.0, "teacher_cache": True, "top_k": 8}, "alpha is 0"),
])
def test_contradicting_settings_are_refused_in_the_recipe(fields, problem, write_recipe):
    from conftest import TINY, tiny_recipe
    from llmpress.recipe import load_recipe

    recipe = tiny_recipe(teacher={"source": TINY}, stages=[{"name": "kd", "kind": "distill", **fields}])
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(recipe))
    assert len(err.value.problems) == 1 and problem in err.value.problems[0], err.value.problems


def test_deepspeed_on_cpu_is_refused_clearly(tiny_model_dir, tmp_path):
    with pytest.raises(UserError) as err:
        distill(tiny_model_dir, tmp_path, "ds", deepspeed="zero2", steps=1)
    (line,) = err.value.problems
    assert line.startswith("deepspeed: 'zero2' — ")


def test_distill_stage_json_carries_the_teacher_and_resources(write_recipe):
    from conftest import TINY, tiny_recipe
    from llmpress.recipe import load_recipe

    recipe = load_recipe(write_recipe(tiny_recipe(teacher={"source": TINY}, stages=[
        {"name": "kd", "kind": "distill", "student": SMALL, "resources": {"gpus": 2}}])))
    stage = json.loads(recipe.stage_json(recipe.stages[0]))
    assert stage["teacher"]["source"] == TINY and stage["resources"]["gpus"] == 2 and stage["resources"]["nodes"] == 1


def test_multi_node_needs_a_shared_claim(write_recipe):
    from conftest import TINY, tiny_recipe
    from llmpress.recipe import load_recipe

    stage = {"name": "kd", "kind": "distill", "resources": {"gpus": 8, "nodes": 2}}
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(tiny_recipe(teacher={"source": TINY}, stages=[stage])))
    assert err.value.problems == ["stages[0].resources.nodes: 2 — only a distill stage spans nodes, and it needs "
                                  "resources.scratch.pvc (a ReadWriteMany claim that every node mounts)"]
    stage["resources"]["scratch"] = {"pvc": "llmpress-work"}
    assert load_recipe(write_recipe(tiny_recipe(teacher={"source": TINY}, stages=[stage]))).stages[0].resources.nodes == 2


@pytest.mark.slow
def test_two_ranks_under_torchrun_follow_the_one_rank_loss_curve(tiny_model_dir, tmp_path):
    """resources.gpus: N runs N ranks; with the global batch fixed, the curve must not move
    (here on CPU through gloo; the GPU path is the same Trainer under NCCL)."""
    from llmpress.components.stages.distill.launch import torchrun_command

    curves = {}
    for ranks, batch in ((1, 8), (2, 4)):
        work = tmp_path / f"r{ranks}"
        spec = write_spec(tmp_path / f"r{ranks}.json", tiny_model_dir, work, tmp_path / f"out{ranks}", steps=20, batch_size=batch, alpha=0.5)
        done = subprocess.run(torchrun_command(spec, ranks), capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert json.loads((work / "metrics.json").read_text())["world_size"] == ranks
        curves[ranks] = [json.loads(line)["train.loss"] for line in (work / "progress.jsonl").read_text().splitlines()]
    assert len(curves[1]) == len(curves[2]) == 20
    assert curves[2] == pytest.approx(curves[1], rel=1e-5)


def test_the_pipeline_step_materializes_the_teacher_and_keeps_checkpoints_under_storage(tiny_model_dir, tmp_path, monkeypatch):
    """steps.run_stage, as the KFP component calls it: teacher from the stage JSON, the loss
    of every step in the stage's MLflow run, the work folder under storage.root, so
    running the step again resumes instead of retraining."""
    from conftest import TINY, tiny_recipe
    from llmpress.components import tracking
    from llmpress.components.kubeflow import steps
    from llmpress.recipe import parse_recipe
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    recipe = parse_recipe(tiny_recipe(name="kd-step", teacher={"source": TINY}, storage={"root": str(tmp_path / "store")}, stages=[
        {"name": "kd", "kind": "distill", "student": SMALL, "steps": 6, "save_every": 3, "batch_size": 4, "device": "cpu",
         "gradient_checkpointing": False, "data": TRAIN.model_dump()}]))
    context = json.dumps({"recipe": "kd-step", "experiment": "tests", "storage": str(tmp_path / "store")})
    stage_json = recipe.stage_json(recipe.stages[0])
    calibration = recipe.data.calibration.model_dump_json()
    done, first = steps.run_stage(str(tiny_model_dir), str(tmp_path / "out1"), stage_json, calibration, context, "")
    (record,) = json.loads(done)["stages"]
    child = tracking._resolve(record["run_id"])
    losses = MlflowClient(uri).get_metric_history(child, "train.loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4, 5, 6]
    # the step's key depends on its inputs only, so a rerun finds the same work folder
    work = tmp_path / "store" / "kd-step" / record["key"] / "kd-work"
    assert first["resumed_from_step"] == 0 and (work / "teacher" / "config.json").is_file()
    assert sorted(p.name for p in (work / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    again_json, again = steps.run_stage(str(tiny_model_dir), str(tmp_path / "out2"), stage_json, calibration, context, "")
    assert json.loads(again_json)["stages"][0]["key"] == record["key"]
    assert again["resumed_from_step"] == 6  # the finished run's last checkpoint: nothing is retrained
    assert (tmp_path / "out2" / "config.json").is_file()
