"""Distill stage on a GPU: DeepSpeed ZeRO-2 and ZeRO-3 runs of the real stage, KD versus
labels alone, what the teacher-logit cache saves, and QLoRA through bitsandbytes.

Every training run is the stage's own worker in a fresh process (``python -m
llmpress.components.stages.distill.launch SPEC``, what the step and torchrun run), so
the DeepSpeed/accelerate state of one run never leaks into the next.

    python benchmarks/distill_bench.py --out DIR [--only zero2,zero3,cache,qlora]

Writes DIR/distill_bench.json (every run's metrics and loss curve) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TEACHER = "pydoc-llama-4m"
DERIVED = {"source": "teacher", "num_layers": 2}  # half the teacher's layers, its weights
TRAIN = {"source": "builtin:pydoc-train", "num_samples": 2048, "seq_len": 256}
HELD_OUT = {"source": "builtin:pydoc-eval", "num_samples": 64, "seq_len": 256}
BASE = dict(alpha=0.5, temperature=2.0, steps=300, learning_rate=1e-3, batch_size=16, warmup_ratio=0.05, save_every=100,
            gradient_checkpointing=True, student=DERIVED, deepspeed="zero2")


def worker(out: Path, name: str, teacher: Path | None, config: dict, data: dict, student_dir: Path | None = None, cache_from: str | None = None) -> dict:
    """One training run of the stage in its own process; returns metrics + loss curve."""
    import shutil

    work = out / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    if cache_from:  # a second student trained from the cache an earlier run built
        shutil.copytree(out / "work" / cache_from / "teacher-cache", work / "teacher-cache", dirs_exist_ok=True)
    spec = {"student_dir": str(student_dir) if student_dir else None, "out_dir": str(out / "models" / name),
            "teacher_dir": str(teacher) if teacher else None, "work_dir": str(work), "config": config, "data": data}
    (work / "spec.json").write_text(json.dumps(spec))
    start = time.time()
    with (out / f"{name}.log").open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "llmpress.components.stages.distill.launch", str(work / "spec.json")],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        print(f"{name}: FAILED (exit {proc.returncode}); tail of {out / f'{name}.log'}:")
        print("".join((out / f"{name}.log").read_text().splitlines(True)[-25:]))
        return {"name": name, "failed": proc.returncode}
    metrics = json.loads((work / "metrics.json").read_text())
    curve = [json.loads(line) for line in (work / "progress.jsonl").read_text().splitlines()]
    return {"name": name, "process_s": time.time() - start, "metrics": metrics,
            "loss_curve": [(c["step"], c["train.loss"]) for c in curve]}


def perplexity(model_dir: Path) -> float:
    from llmpress.components.data import DataSpec, load_texts
    from llmpress.components.stages import evaluate

    data = DataSpec(**HELD_OUT)
    return evaluate.run(model_dir, evaluate.EvaluateConfig(device="cuda"), data, load_texts(data))["perplexity"]


def big_random_teacher(dest: Path, tokenizer_dir: Path) -> Path:
    """A 1.2B-parameter Llama (random weights, bf16) sharing the builtin tokenizer: large
    enough that its forward pass and its memory show what the cache saves."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (dest / "config.json").is_file():
        return dest
    config = LlamaConfig(vocab_size=2048, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", default="zero2,zero3,cache,reuse,qlora")
    args = parser.parse_args()
    only = set(args.only.split(","))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    import torch
    from llmpress.components.models.builtin import build_builtin

    teacher = build_builtin(TEACHER)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    import deepspeed

    results["deepspeed"] = deepspeed.__version__
    runs = results["runs"]
    if "zero2" in only:
        runs.append(worker(out, "kd-zero2", teacher, BASE, TRAIN))
        runs.append(worker(out, "labels-zero2", teacher, {**BASE, "alpha": 0.0}, TRAIN))
    if "zero3" in only:
        runs.append(worker(out, "kd-zero3", teacher, {**BASE, "deepspeed": "zero3"}, TRAIN))
    if "cache" in only:
        big = big_random_teacher(out / "big-teacher", teacher)
        student = {"source": "teacher", "num_layers": 4}
        cfg = {**BASE, "steps": 60, "batch_size": 8, "top_k": 64, "student": student, "save_every": 1000}
        data = {**TRAIN, "num_samples": 480, "seq_len": 512}
        runs.append(worker(out, "big-online", big, cfg, data))
        runs.append(worker(out, "big-cache-build", big, {**cfg, "teacher_cache": True}, data))
        if "reuse" in only:
            runs.append(worker(out, "big-cache-reuse", big, {**cfg, "teacher_cache": True}, data, cache_from="big-cache-build"))
    if "qlora" in only:
        cfg = {"alpha": 0.0, "steps": 100, "learning_rate": 2e-4, "batch_size": 16, "finetune": "qlora", "student": {"source": "input"},
               "lora": {"r": 16, "alpha": 32}, "save_every": 1000, "gradient_checkpointing": True}
        runs.append(worker(out, "qlora", None, cfg, TRAIN, student_dir=teacher))

    (out / "distill_bench.json").write_text(json.dumps(results, indent=1))
    results["perplexity"] = {"teacher": perplexity(teacher)}
    for run in runs:
        model = out / "models" / run["name"]
        if "failed" not in run and (model / "config.json").is_file():
            results["perplexity"][run["name"]] = perplexity(model)
    (out / "distill_bench.json").write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']}, torch {results['torch']}, deepspeed {results['deepspeed']}")
    print(f"{'run':16} {'ZeRO':>4} {'steps':>5} {'loss first':>10} {'loss last':>9} {'train s':>8} {'tok/s':>9} {'peak GiB':>8} {'cache MB':>8} {'ppl':>8}")
    for run in runs:
        if "failed" in run:
            print(f"{run['name']:16} FAILED")
            continue
        m = run["metrics"]
        print(f"{run['name']:16} {m['deepspeed_stage']:>4} {m['steps']:>5} {m['train_loss_first']:>10.4f} {m['train_loss_last']:>9.4f} "
              f"{m['train_wall_s']:>8.1f} {m['train_tokens_per_s']:>9.0f} {m['peak_memory_bytes'] / 2**30:>8.2f} "
              f"{m.get('teacher_cache_bytes', 0) / 1e6:>8.1f} {results['perplexity'].get(run['name'], float('nan')):>8.2f}")
        if "teacher_cache_build_s" in m:
            print(f"{'':16} cache built in {m['teacher_cache_build_s']:.1f}s")
    print(f"teacher perplexity {results['perplexity']['teacher']:.2f}")
    z2 = next((r for r in runs if r["name"] == "kd-zero2" and "loss_curve" in r), None)
    z3 = next((r for r in runs if r["name"] == "kd-zero3" and "loss_curve" in r), None)
    if z2 and z3:
        gaps = [abs(a[1] - b[1]) / a[1] for a, b in zip(z2["loss_curve"], z3["loss_curve"], strict=False)]
        print(f"ZeRO-2 vs ZeRO-3 loss curves: max relative gap {max(gaps):.4f}, mean {sum(gaps) / len(gaps):.4f} over {len(gaps)} steps")


if __name__ == "__main__":
    main()
