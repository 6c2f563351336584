"""llmpress's quantize stage against llm-compressor's ``oneshot`` called directly.

One run, same model, same calibration windows (same data, same seed): for GPTQ and AWQ
W4A16, (a) ``llmpress.components.stages.quantize.run`` and (b) the few lines an
llm-compressor user writes (load, tokenize, ``oneshot`` with the library's preset
scheme, save compressed). Both timed over the same work: load, tokenize, quantize, save.
llmpress then also reloads its output with plain transformers and generates (its
self-check), reported apart. Then int8 and nf4 (bitsandbytes) through llmpress.
Perplexity: held-out pydoc text, same windows for every model.

    python benchmarks/quantize_vs_oneshot.py --model builtin:pydoc-llama-200m --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from llmpress.components.data import DataSpec, calibration_samples, load_texts, token_stream
from llmpress.components.models.io import ModelSpec, fetch_model, pick_device, weights_size_bytes
from llmpress.components.stages import quantize
from llmpress.components.stages.evaluate import perplexity

# What an llm-compressor user writes for each scheme (the library's own presets).
DIRECT_SCHEMES = {"gptq-w4a16": "W4A16", "awq-w4a16": "W4A16_ASYM"}
DATA_FREE = ("fp8",)


def direct_oneshot(model_dir: Path, out_dir: Path, scheme: str, calibration: DataSpec, texts: list[str],
                   phases: dict[str, float] | None = None) -> float:
    """llm-compressor without llmpress; returns seconds for load + tokenize + oneshot + save.
    ``phases``, when given, receives them apart as llmpress's stage reports its own
    (load_time_s, calibrate_time_s: tokenize + oneshot, save_time_s), so an overhead can be
    itemized phase by phase."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    loaded = time.time()
    if scheme == "awq-w4a16":
        recipe: Any = [AWQModifier(), QuantizationModifier(targets="Linear", scheme=DIRECT_SCHEMES[scheme], ignore=["lm_head"])]
    elif scheme == "fp8":
        recipe = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
    elif scheme == "w8a8":
        recipe = [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    else:
        recipe = GPTQModifier(targets="Linear", scheme=DIRECT_SCHEMES[scheme], ignore=["lm_head"])
    if scheme in DATA_FREE:
        oneshot(model=model, recipe=recipe)
    else:
        samples = calibration_samples(calibration, tokenizer, texts)  # the same windows llmpress takes
        dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
        oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=calibration.seq_len,
                num_calibration_samples=len(samples), shuffle_calibration_samples=False)
    calibrated = time.time()
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    end = time.time()
    if phases is not None:
        phases.update(load_time_s=loaded - start, calibrate_time_s=calibrated - loaded, save_time_s=end - calibrated)
    return end - start


def held_out_perplexity(model_dir: Path, evaluation: DataSpec, texts: list[str], device: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    stream = token_stream(texts, AutoTokenizer.from_pretrained(model_dir))
    ppl = perplexity(model, stream, evaluation.seq_len, evaluation.seq_len, evaluation.num_samples, 8, device)[0]
    del model
    _free(device)
    return ppl


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:pydoc-llama-200m", help="builtin:NAME or a local model directory")
    parser.add_argument("--out", default="quantize-bench", help="folder for the quantized models and results.json")
    parser.add_argument("--schemes", nargs="*", default=list(DIRECT_SCHEMES), help="llm-compressor schemes to compare")
    parser.add_argument("--bnb", nargs="*", default=["int8", "nf4"], help="bitsandbytes schemes to run through llmpress")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each path (alternating order)")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows of --seq-len tokens")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device("auto")
    model_dir = fetch_model(ModelSpec(source=args.model), out / "base")
    calibration = DataSpec(source="builtin:pydoc-train", num_samples=args.samples, seq_len=args.seq_len, seed=0)
    evaluation = DataSpec(source="builtin:pydoc-eval", num_samples=args.eval_windows, seq_len=args.seq_len)
    cal_texts, eval_texts = load_texts(calibration), load_texts(evaluation)

    rows: list[dict[str, Any]] = []
    base_ppl = held_out_perplexity(model_dir, evaluation, eval_texts, device)
    _row(rows, {"run": "baseline (bf16)", "perplexity": base_ppl, "size_mb": weights_size_bytes(model_dir) / 1e6})
    import torch

    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    # warm-up: CUDA context, kernels and imports are paid once, before anything is timed
    direct_oneshot(model_dir, out / "warmup", "gptq-w4a16", calibration.model_copy(update={"num_samples": 2}), cal_texts)
    _free(device)
    for scheme in args.schemes:
        # each path `--repeats` times, alternating which goes first; the fastest of each
        # counts (timing noise only ever adds), the first output of each is evaluated
        t_direct, t_ours, metrics = [], [], {}
        for repeat in range(args.repeats):
            for path in (("direct", "llmpress") if repeat % 2 == 0 else ("llmpress", "direct")):
                if path == "direct":
                    t_direct.append(direct_oneshot(model_dir, out / f"{scheme}-oneshot-{repeat}", scheme, calibration, cal_texts))
                else:
                    config = quantize.QuantizeConfig(scheme=scheme)
                    m = quantize.run(model_dir, out / f"{scheme}-llmpress-{repeat}", config, calibration, cal_texts)
                    metrics = metrics or m
                    t_ours.append(m["quantize_time_s"])
                _free(device)
                print(f"{scheme} {path} repeat {repeat}: {(t_direct if path == 'direct' else t_ours)[-1]:.1f}s", flush=True)
        _row(rows, {"run": f"{scheme} oneshot", "perplexity": held_out_perplexity(out / f"{scheme}-oneshot-0", evaluation, eval_texts, device),
                    "size_mb": weights_size_bytes(out / f"{scheme}-oneshot-0") / 1e6, "wall_s": min(t_direct), "times": t_direct})
        _row(rows, {"run": f"{scheme} llmpress", "perplexity": held_out_perplexity(out / f"{scheme}-llmpress-0", evaluation, eval_texts, device),
                    "size_mb": metrics["size_bytes"] / 1e6, "wall_s": min(t_ours), "times": t_ours, "overhead": min(t_ours) / min(t_direct) - 1,
                    "self_check_s": metrics["self_check_time_s"], "peak_gb": metrics["peak_memory_bytes"] / 2**30})
    for scheme in args.bnb:
        metrics = quantize.run(model_dir, out / f"{scheme}-llmpress", quantize.QuantizeConfig(scheme=scheme), calibration, cal_texts)
        _free(device)
        _row(rows, {"run": f"{scheme} llmpress", "perplexity": held_out_perplexity(out / f"{scheme}-llmpress", evaluation, eval_texts, device),
                    "size_mb": metrics["size_bytes"] / 1e6, "wall_s": metrics["quantize_time_s"],
                    "self_check_s": metrics["self_check_time_s"], "peak_gb": metrics["peak_memory_bytes"] / 2**30})

    (out / "results.json").write_text(json.dumps({"model": args.model, "device": device_name, "args": vars(args), "rows": rows}, indent=2))
    print(f"model {args.model}, device {device_name}, {args.samples} x {args.seq_len} calibration tokens, {args.repeats} repeats")
    print(table(rows))


def _row(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    rows.append(row)
    print("row", json.dumps(row), flush=True)  # a run cut short still leaves its rows in the log


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the runs."""

    def cell(value: Any, fmt: str) -> str:
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    lines = ["| run | perplexity | size MB | quantize wall s | overhead vs oneshot | self-check s | peak GPU GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        overhead = r.get("overhead")
        lines.append(f"| {r['run']} | {cell(r['perplexity'], '.3f')} | {cell(r['size_mb'], '.1f')} | {cell(r.get('wall_s'), '.1f')} | "
                     f"{'—' if overhead is None else f'{overhead:+.1%}'} | {cell(r.get('self_check_s'), '.1f')} | {cell(r.get('peak_gb'), '.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
