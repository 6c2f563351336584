"""The quantize stage at the scale users run it: real model shapes on one GPU.

No hub on the GPU machine, so the model is random-initialised with the shapes of a
real one (time and memory depend on shapes, not on the weights' values), built on the
GPU and saved in bf16 with the builtin tokenizer. Each path runs in a process of its
own, so its peak host RSS is its own: (a) llmpress's quantize stage
(``quantize.run``), (b) llm-compressor's ``oneshot`` called directly, as a user writes
it (``quantize_vs_oneshot.direct_oneshot``), on the same model and calibration windows.
Timed work is the same in both: load, tokenize, quantize, save (llmpress's reload
self-check is extra and reported apart). ``--kill-resume`` then runs the stage again,
kills it (SIGKILL) as soon as its calibrated model is persisted, i.e. while it
publishes, checks and reports, and reruns it: the rerun must not calibrate again.

    python benchmarks/at_scale.py --shape llama3-8b --tokenizer DIR --work /tmp/scale --schemes gptq-w4a16 --kill-resume gptq-w4a16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Shapes from the models' published config.json files (weights random, bf16).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 8192,
                  "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen2.5-14b": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    # builtin:pydoc-llama-200m's shapes (the 200M figures of docs/benchmarks.md)
    "llama-200m": {"model_type": "llama", "vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 2048, "tie_word_embeddings": True},
    # a smoke test of this script on a CPU
    "llama-tiny": {"model_type": "llama", "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": False},
}


def build(shape: str, tokenizer_dir: Path, dest: Path) -> float:
    """A random-initialised bf16 model of ``shape`` at ``dest``, built on the GPU; returns seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.time()
    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device(accelerator()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, dest / name)
    return time.time() - start


def accelerator() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def child(path: str, model: str, out: str, scheme: str, samples: int, seq_len: int) -> None:
    """One path in this process; prints one JSON line with its figures."""
    import datasets  # noqa: F401 - both paths' imports are paid before either clock starts
    import llmcompressor  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from llmpress.components.data import DataSpec, load_texts
    from llmpress.components.models.io import weights_size_bytes
    from llmpress.components.stages import quantize

    calibration = DataSpec(source="builtin:pydoc-train", num_samples=samples, seq_len=seq_len, seed=0)
    texts = load_texts(calibration)
    cuda = accelerator() == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if path == "llmpress":
        metrics = quantize.run(model, out, quantize.QuantizeConfig(scheme=scheme, device=accelerator()), calibration, texts)
        row = {"wall_s": metrics["quantize_time_s"], **metrics}
    else:
        from quantize_vs_oneshot import direct_oneshot

        row = {"wall_s": direct_oneshot(Path(model), Path(out), scheme, calibration, texts), "size_bytes": weights_size_bytes(out)}
    row.update(path=path, scheme=scheme, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               peak_gpu_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None)
    print("RESULT " + json.dumps(row), flush=True)


def run_child(args: argparse.Namespace, path: str, scheme: str, out: Path, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    start = time.time()
    command = [sys.executable, __file__, "--child", path, "--model", str(args.work / "base"), "--out", str(out), "--schemes", scheme,
               "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    with log.open("a") as sink:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=sink, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    shutil.rmtree(out, ignore_errors=True)  # sizes are measured; the disk holds few 8B outputs
    if done.returncode or not lines:
        return {"path": path, "scheme": scheme, "error": f"exit {done.returncode}; see {log.name}"}
    return {**json.loads(lines[-1][len("RESULT "):]), "process_s": time.time() - start}


def kill_resume(args: argparse.Namespace, scheme: str, log: Path) -> dict[str, Any]:
    """Kill the stage once its calibrated model is persisted; rerun; the rerun must resume."""
    env = {**os.environ, "LLMPRESS_CACHE": str(args.work / "kill-cache")}
    resume_root = args.work / "kill-cache" / "resume"
    command = [sys.executable, __file__, "--child", "llmpress", "--model", str(args.work / "base"), "--out", str(args.work / f"{scheme}-killed"),
               "--schemes", scheme, "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    start = time.time()
    with log.open("a") as sink:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink, env=env)
        while proc.poll() is None and not list(resume_root.glob("quantize-*/llmpress-calibrated.json")):
            time.sleep(0.05)
        persisted_s = time.time() - start
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = {"killed_after_s": persisted_s, "exit": proc.returncode, "persisted": bool(list(resume_root.glob("quantize-*/llmpress-calibrated.json")))}
    rerun = run_child(args, "llmpress", scheme, args.work / f"{scheme}-resumed", log, env)
    return {"path": "kill+resume", "scheme": scheme, **killed, "rerun": rerun}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (the builtin tokenizer)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/at-scale"), help="folder for the models")
    parser.add_argument("--results", type=Path, default=None, help="JSON-lines file for the rows (default WORK/results.jsonl)")
    parser.add_argument("--schemes", nargs="*", default=["gptq-w4a16"], help="llm-compressor schemes, each path once")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each path (alternating order)")
    parser.add_argument("--kill-resume", nargs="*", default=[], help="schemes to kill once persisted and rerun")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--child", choices=["llmpress", "direct"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.out, args.schemes[0], args.samples, args.seq_len)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    results = args.results or args.work / "results.jsonl"
    log = results.with_suffix(".log")

    def emit(row: dict[str, Any]) -> None:
        row = {"shape": args.shape, **row}
        with results.open("a") as sink:
            sink.write(json.dumps(row) + "\n")
        print("row", json.dumps(row), flush=True)

    if not (args.work / "base" / "config.json").exists():
        emit({"path": "build", "wall_s": build(args.shape, args.tokenizer, args.work / "base")})
    for scheme in args.schemes:
        for repeat in range(args.repeats):
            for path in ("llmpress", "direct") if repeat % 2 == 0 else ("direct", "llmpress"):
                emit({"repeat": repeat, **run_child(args, path, scheme, args.work / f"{scheme}-{path}-{repeat}", log)})
    for scheme in args.kill_resume:
        emit(kill_resume(args, scheme, log))


if __name__ == "__main__":
    main()
