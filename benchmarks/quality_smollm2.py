"""Quality of every compression method on a real pretrained model, SmolLM2-135M-Instruct
(builtin:smollm2-135m), against one baseline measured on the same evaluation windows of
two held-out texts: builtin:pydoc-eval (CPython documentation) and builtin:lee-news
(ABC news prose, a domain the stages never calibrate on).

Each row runs a stage's own ``run()`` (what a pipeline step runs), then evaluates its
output with the evaluate stage on both texts. Results go to a JSON file row by row, so
a rerun skips the rows already measured (``--redo NAME`` measures one again); the
Markdown table is printed from that file.

    python benchmarks/quality_smollm2.py --out /tmp/quality.json [--device cuda] [--rows NAME ...] [--table-only]

A row that fails is recorded with its error (one line) and the next row runs; rerunning
measures it again. One results file holds one device's rows: the baseline is measured on
that device, so every ratio compares like with like.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from llmpress.components.data import DataSpec, load_texts, token_stream
from llmpress.components.models.builtin import build_builtin
from llmpress.components.models.io import count_parameters, load_model, weights_size_bytes
from llmpress.components.stages import distill, evaluate, prune, quantize

CALIBRATION = DataSpec(source="builtin:pydoc-train", num_samples=64, seq_len=256, seed=0)
# KD training text: other windows of the same training split (seed 1), never the evaluation texts
TRAINING = DataSpec(source="builtin:pydoc-train", num_samples=256, seq_len=256, seed=1)
EVAL_WINDOWS = 16
TEXTS = {"pydoc": "builtin:pydoc-eval", "news": "builtin:lee-news"}
# deepspeed off: the figure is the recovery, not the launcher (DeepSpeed's ZeRO-2 is the
# stage's default on CUDA and changes nothing for a 135M model on one GPU)
KD = {"deepspeed": "off", "steps": 60, "batch_size": 4, "learning_rate": 5e-5, "temperature": 2.0, "gradient_checkpointing": False, "save_every": 1000}

# name -> (stage kind, settings, input row or None for the baseline model, note)
ROWS: dict[str, tuple[str, dict[str, Any], str | None, str]] = {
    "rtn-w4a16 g64 sym": ("quantize", {"scheme": "rtn-w4a16", "group_size": 64, "symmetric": True}, None, "round-to-nearest"),
    "rtn-w4a16 g64 asym": ("quantize", {"scheme": "rtn-w4a16", "group_size": 64, "symmetric": False}, None, "round-to-nearest, zero points"),
    "gptq-w4a16 g64": ("quantize", {"scheme": "gptq-w4a16", "group_size": 64}, None, "default settings (symmetric)"),
    "awq-w4a16 g64": ("quantize", {"scheme": "awq-w4a16", "group_size": 64}, None, "default settings (zero points)"),
    "w8a8": ("quantize", {"scheme": "w8a8"}, None, "SmoothQuant + GPTQ int8"),
    "fp8": ("quantize", {"scheme": "fp8"}, None, "FP8 dynamic"),
    "int8": ("quantize", {"scheme": "int8"}, None, "LLM.int8()"),
    "nf4": ("quantize", {"scheme": "nf4"}, None, "bitsandbytes"),
    "fp4": ("quantize", {"scheme": "fp4"}, None, "bitsandbytes"),
    "magnitude 50%": ("prune", {"method": "magnitude", "sparsity": 0.5}, None, ""),
    "wanda 50%": ("prune", {"method": "wanda", "sparsity": 0.5}, None, ""),
    "sparsegpt 50%": ("prune", {"method": "sparsegpt", "sparsity": 0.5}, None, ""),
    "magnitude 2:4": ("prune", {"method": "magnitude", "mask_structure": "2:4"}, None, ""),
    "wanda 2:4": ("prune", {"method": "wanda", "mask_structure": "2:4"}, None, ""),
    "sparsegpt 2:4": ("prune", {"method": "sparsegpt", "mask_structure": "2:4"}, None, ""),
    # 3 key/value groups: 20% of them is not a whole group, so 20% of the FFN channels go
    "structured ffn 20%": ("prune", {"method": "structured", "ffn_sparsity": 0.2, "channel_multiple": 64}, None, "no recovery"),
    "structured ffn 20% + KD": ("distill", {"alpha": 0.7, **KD}, "structured ffn 20%", "KD recovery from the unpruned model"),
    "student 15 layers, KD": ("distill", {"alpha": 0.7, "student": {"source": "teacher", "num_layers": 15}, **KD}, None, "half the layers"),
    "student 15 layers, labels only": ("distill", {"alpha": 0.0, "student": {"source": "teacher", "num_layers": 15}, **KD}, None, "same, no teacher"),
    # the x1.21 investigation: what the libraries offer for GPTQ
    "gptq g64 actorder static": ("quantize", {"scheme": "gptq-w4a16", "group_size": 64, "actorder": "static"}, None, "the library's default"),
    "gptq g64 dampening 0.1": ("quantize", {"scheme": "gptq-w4a16", "group_size": 64, "dampening_frac": 0.1}, None, ""),
    "gptq g64 asym": ("quantize", {"scheme": "gptq-w4a16", "group_size": 64, "symmetric": False}, None, "zero points"),
    "gptq g32": ("quantize", {"scheme": "gptq-w4a16", "group_size": 32}, None, ""),
    "gptq g64 256 samples": ("quantize", {"scheme": "gptq-w4a16", "group_size": 64, "calibration": {**CALIBRATION.model_dump(), "num_samples": 256}}, None, ""),
    "gptq g64 down_proj 16-bit": ("quantize", {"scheme": "gptq-w4a16", "group_size": 64, "ignore": ["lm_head", "re:.*down_proj"]}, None, "mixed precision"),
    # zero points helped most alone: combined with the others
    "gptq g64 asym 256 samples": ("quantize", {"scheme": "gptq-w4a16", "group_size": 64, "symmetric": False,
                                               "calibration": {**CALIBRATION.model_dump(), "num_samples": 256}}, None, "zero points"),
    "gptq g64 asym dampening 0.1": ("quantize", {"scheme": "gptq-w4a16", "group_size": 64, "symmetric": False, "dampening_frac": 0.1}, None, "zero points"),
    "gptq g32 asym": ("quantize", {"scheme": "gptq-w4a16", "group_size": 32, "symmetric": False}, None, "zero points"),
    "gptq g64 asym down_proj 16-bit": ("quantize", {"scheme": "gptq-w4a16", "group_size": 64, "symmetric": False,
                                                    "ignore": ["lm_head", "re:.*down_proj"]}, None, "zero points, mixed precision"),
    "gptq g64 asym auto_ignore 7.5": ("quantize", {"scheme": "gptq-w4a16", "group_size": 64, "symmetric": False, "auto_ignore": {"budget": 7.5}}, None,
                                      "zero points, mixed precision"),
}


def evaluate_both(model_dir: Path, baselines: dict[str, Any] | None, device: str) -> dict[str, Any]:
    """Perplexity on both texts, the same first EVAL_WINDOWS windows of 256 tokens for
    every model. Computed in float32 (the weights as stored, upcast) on every device: the
    development CPU has no bf16 arithmetic (emulated bf16 made one evaluation take minutes),
    and one arithmetic for every row and device keeps the figures comparable."""
    model, tokenizer = load_model(model_dir, dtype="float32", device=device)
    size, params = weights_size_bytes(model_dir), count_parameters(model)
    out: dict[str, Any] = {}
    for key, source in TEXTS.items():
        stream = token_stream(load_texts(DataSpec(source=source)), tokenizer)
        ppl, tokens, windows = evaluate.perplexity(model, stream, 256, 256, EVAL_WINDOWS, 8, device)
        out[key] = {"perplexity": ppl, "eval_tokens": tokens, "eval_windows": windows, "size_bytes": size, "num_parameters": params,
                    "bits_per_parameter": 8 * size / params}
        if baselines:
            out[key]["perplexity_ratio"] = ppl / baselines[key]["perplexity"]
    return out


def run_row(name: str, base_dir: Path, work: Path, made: dict[str, Path], device: str) -> tuple[Path, dict[str, Any]]:
    kind, settings, source, _ = ROWS[name]
    out = work / name.replace(" ", "_").replace("%", "pct").replace(":", "of").replace(",", "")
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    if kind == "quantize":
        config = quantize.QuantizeConfig(device=device, **settings)
        data = config.calibration or CALIBRATION
        metrics = quantize.run(base_dir, out, config, data, load_texts(data))
    elif kind == "prune":
        config = prune.PruneConfig(device=device, **settings)
        metrics = prune.run(base_dir, out, config, CALIBRATION, load_texts(CALIBRATION))
    else:
        config = distill.DistillConfig(device=device, data=TRAINING, **settings)
        student = made[source] if source else (None if config.student.source == "teacher" else base_dir)
        metrics = distill.run(student, out, config, TRAINING, load_texts(TRAINING), base_dir, work / f"{out.name}-work")
    metrics["stage_wall_time_s"] = time.time() - start
    return out, metrics


def table(results: dict[str, Any]) -> str:
    base = results["baseline"]
    lines = [
        f"baseline: SmolLM2-135M-Instruct from its Q4_1 GGUF, as bf16; perplexity {base['pydoc']['perplexity']:.2f} (pydoc-eval), "
        f"{base['news']['perplexity']:.2f} (lee-news), {EVAL_WINDOWS} windows of 256 tokens each, the same for every row (float32 arithmetic)",
        f"measured on {results.get('environment', results.get('device', 'cpu'))}",
        "",
        "| method | note | size MB | bits/param | ppl pydoc | ratio | ppl news | ratio | stage s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| baseline (bf16) | | {base['pydoc']['size_bytes'] / 1e6:.1f} | {base['pydoc']['bits_per_parameter']:.2f} | "
        f"{base['pydoc']['perplexity']:.2f} | 1.000 | {base['news']['perplexity']:.2f} | 1.000 | |",
    ]
    for name, (_, _, _, note) in ROWS.items():
        row = results["rows"].get(name)
        if row is None or "error" in row:
            lines.append(f"| {name} | {note} | {'not measured' if row is None else 'failed: ' + row['error'].replace('|', '/')} | | | | | | |")
            continue
        p, n = row["eval"]["pydoc"], row["eval"]["news"]
        lines.append(f"| {name} | {note} | {p['size_bytes'] / 1e6:.1f} | {p['bits_per_parameter']:.2f} | {p['perplexity']:.2f} | "
                     f"{p['perplexity_ratio']:.3f} | {n['perplexity']:.2f} | {n['perplexity_ratio']:.3f} | {row['stage']['stage_wall_time_s']:.0f} |")
    return "\n".join(lines)


def measure(name: str, results: dict[str, Any], base_dir: Path, work: Path, made: dict[str, Path], device: str) -> None:
    """One row (and the row it starts from, if not made yet) into ``results``; a failure is
    recorded as its error's last line, so one broken method does not stop the table."""
    _, _, source, _ = ROWS[name]
    try:
        if source and source not in made:
            made[source], _ = run_row(source, base_dir, work, made, device)
        out, stage_metrics = run_row(name, base_dir, work, made, device)
        made[name] = out
        scalars = {k: v for k, v in stage_metrics.items() if isinstance(v, int | float | str)}
        results["rows"][name] = {"stage": scalars, "eval": evaluate_both(out, results["baseline"], device)}
        row = results["rows"][name]["eval"]
        print(f"{name}: {row['pydoc']['perplexity']:.2f} / {row['news']['perplexity']:.2f}", flush=True)
    except Exception as error:  # noqa: BLE001 - recorded per row; the script goes on with the next
        traceback.print_exc()
        last_line = (str(error).strip().splitlines() or [""])[-1]
        results["rows"][name] = {"error": f"{type(error).__name__}: {last_line}"[:300]}
        print(f"{name}: FAILED {results['rows'][name]['error']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON (rows already in it are skipped)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every stage and evaluation runs")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="rows to measure, by name")
    parser.add_argument("--redo", nargs="*", default=[], help="rows to measure again")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    if results.get("device", args.device) != args.device and not args.table_only:
        sys.exit(f"{args.out} holds {results['device']} rows; use another --out for --device {args.device}")
    if not args.table_only:
        results["device"] = args.device
        base_dir = build_builtin("smollm2-135m")
        if "baseline" not in results:
            results["baseline"] = evaluate_both(base_dir, None, args.device)
            results["environment"] = environment(args.device)
            args.out.write_text(json.dumps(results, indent=1))
        work = Path(tempfile.mkdtemp(prefix="llmpress-quality-"))
        made: dict[str, Path] = {}
        try:
            for name in args.rows:
                done = results["rows"].get(name)
                if done and "error" not in done and name not in args.redo:
                    continue
                measure(name, results, base_dir, work, made, args.device)
                args.out.write_text(json.dumps(results, indent=1))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))


def environment(device: str) -> str:
    """The device and library versions the table was measured with."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    where = f"cuda: {torch.cuda.get_device_name()}" if device == "cuda" else f"cpu: {torch.get_num_threads()} threads"
    libraries = []
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "bitsandbytes"):
        try:
            libraries.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return f"{where}; {', '.join(libraries)}"


if __name__ == "__main__":
    main()
