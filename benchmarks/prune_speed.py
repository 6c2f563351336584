"""Structured pruning speed-up: forward latency of a Llama before and after removing
20–40% of its attention key/value groups and FFN channels with llmpress's structured
pruning (the same functions the prune stage runs: importance → choose → shrink).

The models are random-initialised Llamas of real shapes (speed does not depend on the
weights' values; no pretrained checkpoint of these sizes is available offline), so
this measures speed only; quality is measured elsewhere (docs/pruning.md).

    python benchmarks/prune_speed.py --shape cpu-small --device cpu
    python benchmarks/prune_speed.py --shape llama-1b llama-8b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import torch
from llmpress.components.stages.prune import structured as prune_structured
from transformers import AutoModelForCausalLM, LlamaConfig

SHAPES = {
    # a small Llama for a 2-core CPU (about 70M parameters)
    "cpu-small": dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048, num_hidden_layers=8, vocab_size=8192),
    # the shapes of Llama-3.2-1B and Llama-3.1-8B
    "llama-1b": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192, num_hidden_layers=16, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256),
}


def build(shape: str, dtype: torch.dtype, device: str) -> Any:
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: an 8B CPU init takes minutes
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


Timing = tuple[float, float]  # (median, minimum) seconds


def paired_latency(base: Any, pruned: Any, batch: int, tokens: int, device: str, repeats: int, clock: Any = time.perf_counter) -> tuple[Timing, Timing]:
    """Median seconds of one forward pass of each model over fixed random token ids.

    The two models run alternately, so a machine whose load changes while it is
    measured (a shared CPU) slows both alike."""
    ids = torch.randint(0, base.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for i in range(repeats + 2):
            for which, model in enumerate((base, pruned)):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = clock()
                model(input_ids=ids)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:  # warm-ups: allocator, kernel selection, caches
                    times[which].append(clock() - t0)
    # the median, and the minimum: on a loaded machine the least-disturbed run
    return (statistics.median(times[0]), min(times[0])), (statistics.median(times[1]), min(times[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", default=["cpu-small"], choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.4], help="attention_sparsity = ffn_sparsity")
    parser.add_argument("--inputs", nargs="+", default=["1x128"], help="BATCHxTOKENS of the timed forward pass")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--channel-multiple", type=int, default=64)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: this process's CPU seconds on one thread, which other processes on a shared machine disturb far less than wall time")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    clock = time.perf_counter
    if args.clock == "cpu":
        torch.set_num_threads(1)  # idle worker threads would spin and count
        clock = time.process_time
    inputs = [tuple(int(x) for x in spec.split("x")) for spec in args.inputs]
    rows = []
    header = "| shape | ratio → params removed | heads / kv heads | FFN width | params M | input | before ms | after ms | speed-up | speed-up of min |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape in args.shape:
        base = build(shape, dtype, args.device)
        params = sum(p.numel() for p in base.parameters())
        cfg = base.config
        calib = torch.randint(0, cfg.vocab_size, (4, 256), generator=torch.Generator().manual_seed(1)).tolist()
        scores = prune_structured.importance(base, calib, args.device)
        for ratio in args.ratios:
            model = copy.deepcopy(base)
            groups, channels = prune_structured.plan(model, params, ratio, ratio, None, args.channel_multiple)
            prune_structured.shrink(model, prune_structured.choose(scores, groups, channels))
            pruned_params = sum(p.numel() for p in model.parameters())
            for bt in inputs:
                before, after = paired_latency(base, model, *bt, args.device, args.repeats, clock)
                rows.append({"shape": shape, "ratio": ratio, "heads": f"{cfg.num_attention_heads}→{model.config.num_attention_heads}",
                             "kv": f"{cfg.num_key_value_heads}→{groups}", "ffn": f"{cfg.intermediate_size}→{channels}",
                             "params": params, "pruned_params": pruned_params, "input": bt,
                             "before_ms": before[0] * 1e3, "after_ms": after[0] * 1e3, "before_min_ms": before[1] * 1e3, "after_min_ms": after[1] * 1e3})
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
        for row in rows:
            if row["shape"] == shape:
                removed = 1 - row["pruned_params"] / params
                speedup = row["before_ms"] / row["after_ms"]
                print(f"| {shape} | {row['ratio']:.0%} → {removed:.1%} | {row['heads']} / {row['kv']} | {row['ffn']} "
                      f"| {params / 1e6:.0f} → {row['pruned_params'] / 1e6:.0f} | {row['input'][0]}×{row['input'][1]} "
                      f"| {row['before_ms']:.2f} | {row['after_ms']:.2f} | {speedup:.2f}× "
                      f"| {row['before_min_ms'] / row['after_min_ms']:.2f}× |", flush=True)
        del base, scores
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
