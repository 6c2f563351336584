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

``--steps`` runs, in its order (most important first: each row is written as it ends,
and ``--stop-after`` cuts what would run past the device call's limit):

- ``SCHEME``: both paths ``--repeats`` times, alternating which goes first; a quantize
  scheme, or ``sparsegpt-2:4``: the prune stage (``prune.run``, SparseGPT 2:4) against
  ``oneshot`` with ``SparseGPTModifier(sparsity=0.5, mask_structure="2:4")`` as
  ``sparsegpt_vs_oneshot.py`` writes it; ``SCHEME=direct`` or ``SCHEME=llmpress``: one path;
- ``evaluate``: the evaluate stage's own functions on the model (``perplexity``, strided
  and disjoint windows; ``speed.latency`` at batch 1 and 32): tokens/s, ms/token, peak GPU
  memory (random weights: the perplexity value means nothing);
- ``s3``: ``artifacts_bench.py --artifact`` on the model folder (SeaweedFS on 127.0.0.1,
  ``weed`` on the PATH);
- ``kill-resume=SCHEME``: as ``--kill-resume``;
- ``sparsegpt-layer``: llm-compressor's SparseGPT 2:4 (``sparsify_weight``) on one decoder
  layer's Linear shapes, with Hessians of random activations, timed on the device: seconds
  a layer and the whole model's calibration estimated from it (x layers), before a device
  call is spent on a path that may not fit in it.

``--parallel`` (a machine with two GPUs) runs a step's two paths at the same time, one on
each GPU (swapped each repeat): both see the same host load, and a pair costs the device
time of its slower path.

    python benchmarks/at_scale.py --shape llama3-8b --tokenizer DIR --work /tmp/scale --schemes gptq-w4a16 --kill-resume gptq-w4a16
    python benchmarks/at_scale.py --shape llama3-8b --tokenizer DIR --work /tmp/scale --stop-after 540 \
        --steps w8a8=direct sparsegpt-2:4 evaluate awq-w4a16 s3
"""

from __future__ import annotations

import argparse
import json
import math
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
    # Llama-3.2-1B's shapes: the 128k vocabulary of the 8B at a size the development CPU holds
    "llama3.2-1b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 8192,
                    "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
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


PRUNE_SCHEMES = ("sparsegpt-2:4",)


def child(path: str, model: str, out: str, scheme: str, samples: int, seq_len: int) -> None:
    """One path in this process; prints one JSON line with its figures."""
    import logging

    # the stages' phase lines, timestamped, in the log: where a child killed by --stop-after was
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import datasets  # noqa: F401 - both paths' imports are paid before either clock starts
    import llmcompressor  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from llmpress.components.data import DataSpec, load_texts
    from llmpress.components.models.io import weights_size_bytes
    from llmpress.components.stages import prune, quantize

    timeline = RssTimeline()

    def peaks() -> dict[str, Any]:
        cuda = torch.cuda.is_available()
        return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}

    def killed(_signum: int, _frame: Any) -> None:  # --stop-after: the peaks so far, for the row
        print("PARTIAL " + json.dumps({"path": path, "scheme": scheme, **peaks(), "rss_timeline": timeline.stop()}), flush=True)
        os._exit(143)

    signal.signal(signal.SIGTERM, killed)
    calibration = DataSpec(source="builtin:pydoc-train", num_samples=samples, seq_len=seq_len, seed=0)
    texts = load_texts(calibration)
    cuda = accelerator() == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if path == "evaluate":
        row = evaluate_figures(Path(model))
    elif path == "layer":
        row = sparsegpt_layer_time(Path(model), samples * seq_len)
    elif path == "llmpress" and scheme in PRUNE_SCHEMES:
        config = prune.PruneConfig(method="sparsegpt", mask_structure="2:4", device=accelerator())
        metrics = prune.run(model, out, config, calibration, texts)
        row = {"wall_s": metrics["prune_time_s"], **{k: v for k, v in metrics.items() if k != "layers"}}
    elif path == "llmpress":
        metrics = quantize.run(model, out, quantize.QuantizeConfig(scheme=scheme, device=accelerator()), calibration, texts)
        row = {"wall_s": metrics["quantize_time_s"], **metrics}
    elif scheme in PRUNE_SCHEMES:
        row = {"wall_s": direct_sparsegpt(Path(model), Path(out), calibration, texts), "size_bytes": weights_size_bytes(out)}
    else:
        from quantize_vs_oneshot import direct_oneshot

        phases: dict[str, float] = {}
        row = {"wall_s": direct_oneshot(Path(model), Path(out), scheme, calibration, texts, phases), **phases, "size_bytes": weights_size_bytes(out)}
    row.update(path=path, scheme=scheme, **peaks())
    row["rss_timeline"] = timeline.stop()
    if path == "evaluate" and cuda:  # each part reset the peak counter: the process's peak is the largest part's
        row["peak_gpu_gib"] = max(row["strided"]["peak_gpu_gib"], row["disjoint"]["peak_gpu_gib"], row["latency_peak_gpu_gib"])
    print("RESULT " + json.dumps(row), flush=True)


class RssTimeline:
    """The process's resident set sampled every 0.1 s from the clock's start; ``stop``
    returns [seconds, GiB] pairs, the largest sample of each second: which phase the
    peak host RSS falls in, read against the phases' durations."""

    def __init__(self) -> None:
        import threading

        self.start, self.samples, self.done = time.time(), {}, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.done.wait(0.1):
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page / 2**30
            second = int(time.time() - self.start)
            self.samples[second] = max(rss, self.samples.get(second, 0.0))

    def stop(self) -> list[list[float]]:
        self.done.set()
        self.thread.join()
        return [[second, round(gib, 2)] for second, gib in sorted(self.samples.items())]


def direct_sparsegpt(model_dir: Path, out_dir: Path, calibration: Any, texts: list[str]) -> float:
    """llm-compressor's SparseGPT 2:4 without llmpress, as ``sparsegpt_vs_oneshot.py``
    calls it; returns seconds for load + tokenize + oneshot + save."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmpress.components.data import calibration_samples
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(calibration, tokenizer, texts)  # the same windows llmpress takes
    dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    oneshot(model=model, dataset=dataset, recipe=SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=[r"re:model.layers.\d*$"]),
            max_seq_length=calibration.seq_len, num_calibration_samples=len(samples), shuffle_calibration_samples=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return time.time() - start


def sparsegpt_layer_time(model_dir: Path, tokens: int) -> dict[str, Any]:
    """SparseGPT 2:4 as llm-compressor runs it on each Linear of one decoder layer of the
    model's shapes (random weights; Hessians of ``tokens`` random activations), on the
    device: the column loop's cost grows with the input columns, not with the data."""
    import torch
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import accumulate_hessian, make_empty_hessian, sparsify_weight

    config = json.loads((model_dir / "config.json").read_text())
    hidden, inner, heads, kv = (config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"))
    head_dim = hidden // heads
    shapes = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden), "v_proj": (kv * head_dim, hidden),
              "o_proj": (hidden, heads * head_dim), "gate_proj": (inner, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner)}
    device = accelerator()
    seconds: dict[str, float] = {}
    for name, (rows, columns) in shapes.items():
        layer = torch.nn.Linear(columns, rows, bias=False, device=device, dtype=torch.bfloat16)
        hessian, count = make_empty_hessian(layer), 0
        for _ in range(max(1, tokens // 512)):
            hessian, count = accumulate_hessian(torch.randn(1, 512, columns, device=device, dtype=torch.bfloat16), layer, hessian, count)
        _sync(device)
        start = time.time()
        with torch.no_grad():  # as the modifier calls it
            sparsify_weight(layer, {layer: hessian}, sparsity=0.5, prune_n=2, prune_m=4, block_size=128, dampening_frac=0.01,
                            preserve_sparsity_mask=False)
        _sync(device)
        seconds[name] = time.time() - start
    per_layer = sum(seconds.values())
    columns = sum(c for _, c in shapes.values())
    return {"wall_s": per_layer, "modules_s": seconds, "input_columns": columns, "ms_per_column": 1000 * per_layer / columns,
            "layers": config["num_hidden_layers"], "calibration_estimate_s": per_layer * config["num_hidden_layers"]}


def evaluate_figures(model_dir: Path) -> dict[str, Any]:
    """The evaluate stage's perplexity and latency functions on the model, each timed and
    with its own peak GPU memory (the weights are random: the perplexity value means nothing)."""
    from llmpress.components.data import DataSpec, load_texts, token_stream
    from llmpress.components.models.io import load_model
    from llmpress.components.models.measure import peak_memory
    from llmpress.components.stages.evaluate import compute_dtype, device_label, perplexity
    from llmpress.components.stages.evaluate.speed import latency

    device = accelerator()
    tiny = device == "cpu"
    seq_len, windows, batch = (64, 8, 4) if tiny else (2048, 64, 8)
    start = time.time()
    model, tokenizer = load_model(model_dir, dtype=compute_dtype(device), device=device)
    row: dict[str, Any] = {"load_s": time.time() - start, "eval_device": device_label(device), "seq_len": seq_len, "batch_size": batch}
    stream = token_stream(load_texts(DataSpec(source="builtin:pydoc-train", seq_len=seq_len)), tokenizer)
    perplexity(model, stream, seq_len, seq_len, batch, batch, device)  # warm-up: kernels and allocator
    for label, stride in (("strided", seq_len // 2), ("disjoint", seq_len)):
        with peak_memory(device) as peak:
            _sync(device)
            begin = time.time()
            ppl, scored, used = perplexity(model, stream, seq_len, stride, windows, batch, device)
            _sync(device)
        seconds = time.time() - begin
        row[label] = {"stride": stride, "windows": used, "scored_tokens": scored, "seconds": seconds, "tokens_per_s": scored / seconds,
                      "perplexity": ppl, "peak_gpu_gib": peak["bytes"] / 2**30 if device == "cuda" else None}
    prompt, new = (16, 8) if tiny else (512, 64)
    with peak_memory(device) as peak:
        row["latency"] = latency(model, [1, 32], prompt, new, 3, device)
    row["latency_peak_gpu_gib"] = peak["bytes"] / 2**30 if device == "cuda" else None
    row["wall_s"] = time.time() - start
    del model
    return row


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


NOT_RUN = "not run: --stop-after reached"


def child_command(args: argparse.Namespace, path: str, scheme: str, out: Path) -> list[str]:
    return [sys.executable, __file__, "--child", path, "--model", str(args.work / "base"), "--out", str(out), "--schemes", scheme,
            "--samples", str(args.samples), "--seq-len", str(args.seq_len)]


def seconds_left(args: argparse.Namespace) -> float:
    """Until --stop-after; a step with 5 s or less left is not started."""
    return args.deadline - time.time()


def run_child(args: argparse.Namespace, path: str, scheme: str, out: Path, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    start = time.time()
    command = child_command(args, path, scheme, out)
    left = seconds_left(args)
    if left <= 5:
        return {"path": path, "scheme": scheme, "error": NOT_RUN}
    with log.open("a") as sink:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sink, text=True, env=env)
        try:
            stdout, _ = proc.communicate(timeout=left if math.isfinite(left) else None)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the child prints its peaks so far (PARTIAL); its phases are in the log
            try:
                stdout, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            shutil.rmtree(out, ignore_errors=True)
            partial = [line for line in stdout.splitlines() if line.startswith("PARTIAL ")]
            return {"path": path, "scheme": scheme, "error": f"killed after {time.time() - start:.0f} s: --stop-after reached; phases so far in {log.name}",
                    **({"partial": json.loads(partial[-1][len("PARTIAL "):])} if partial else {})}
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    shutil.rmtree(out, ignore_errors=True)  # sizes are measured; the disk holds few 8B outputs
    if proc.returncode or not lines:
        return {"path": path, "scheme": scheme, "error": f"exit {proc.returncode}; see {log.name}"}
    return {**json.loads(lines[-1][len("RESULT "):]), "process_s": time.time() - start}


def run_pair(args: argparse.Namespace, paths: list[str], scheme: str, folder: str, repeat: int, log: Path) -> list[dict[str, Any]]:
    """Both paths at the same time, each on a GPU of its own (``--parallel``, a machine with
    two): the same host load for both, and half the device time. The GPUs swap each repeat."""
    from concurrent.futures import ThreadPoolExecutor

    def one(gpu: int, path: str) -> dict[str, Any]:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        row = run_child(args, path, scheme, args.work / f"{folder}-{path}-{repeat}", log, env)
        return {"repeat": repeat, "gpu": gpu, "concurrent": True, **row}

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, [0, 1], paths))


def s3_transfer(args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """``artifacts_bench.py --artifact`` on the model folder, in a process of its own."""
    figures = args.work / "s3.json"
    command = [sys.executable, str(Path(__file__).with_name("artifacts_bench.py")), "--artifact", str(args.work / "base"),
               "--workdir", str(args.work), "--json", str(figures)]
    left = seconds_left(args)
    if left <= 5:
        return {"path": "s3", "error": NOT_RUN}
    with log.open("a") as sink:
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=sink, text=True, timeout=left if math.isfinite(left) else None)
        except subprocess.TimeoutExpired:
            return {"path": "s3", "error": "killed: --stop-after reached"}
    print(done.stdout, flush=True)
    if done.returncode or not figures.exists():
        return {"path": "s3", "error": f"exit {done.returncode}; see {log.name}"}
    return {"path": "s3", **json.loads(figures.read_text())}


def kill_resume(args: argparse.Namespace, scheme: str, log: Path) -> dict[str, Any]:
    """Kill the stage once its calibrated model is persisted; rerun; the rerun must resume."""
    env = {**os.environ, "LLMPRESS_CACHE": str(args.work / "kill-cache")}
    resume_root = args.work / "kill-cache" / "resume"
    command = child_command(args, "llmpress", scheme, args.work / f"{scheme}-killed")
    start = time.time()
    if seconds_left(args) <= 5:
        return {"path": "kill+resume", "scheme": scheme, "error": NOT_RUN}
    with log.open("a") as sink:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink, env=env)
        while proc.poll() is None and not list(resume_root.glob("quantize-*/llmpress-calibrated.json")):
            if seconds_left(args) < 0:  # the first run obeys --stop-after too (call 10 ran into the call's limit)
                proc.kill()
                proc.wait()
                return {"path": "kill+resume", "scheme": scheme, "error": f"killed after {time.time() - start:.0f} s before it persisted: --stop-after reached"}
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
    parser.add_argument("--steps", nargs="*", help="what to run, in order (see above); replaces --schemes and --kill-resume")
    parser.add_argument("--parallel", action="store_true", help="run a step's two paths at once, on GPUs 0 and 1")
    parser.add_argument("--stop-after", type=float, default=float("inf"), help="seconds: a step still running then is killed, later ones skipped")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--child", choices=["llmpress", "direct", "evaluate", "layer"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.deadline = time.time() + args.stop_after
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
    steps = args.steps if args.steps is not None else [*args.schemes, *(f"kill-resume={s}" for s in args.kill_resume)]
    for step in steps:
        name, _, which = step.partition("=")
        if name == "evaluate":
            emit(run_child(args, "evaluate", "-", args.work / "evaluate", log))
        elif name == "sparsegpt-layer":
            emit(run_child(args, "layer", "sparsegpt-2:4", args.work / "layer", log))
        elif name == "s3":
            emit(s3_transfer(args, log))
        elif name == "kill-resume":
            emit(kill_resume(args, which, log))
        else:
            folder = name.replace(":", "of")
            for repeat in range(args.repeats):
                order = ("llmpress", "direct") if repeat % 2 == 0 else ("direct", "llmpress")
                paths = [p for p in order if which in ("", p)]
                if args.parallel and len(paths) == 2:
                    for row in run_pair(args, paths, name, folder, repeat, log):
                        emit(row)
                    continue
                for path in paths:
                    emit({"repeat": repeat, **run_child(args, path, name, args.work / f"{folder}-{path}-{repeat}", log)})


if __name__ == "__main__":
    main()
