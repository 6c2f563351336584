"""Perplexity speed: llmpress's batched evaluation against the same computation written
plainly in PyTorch, on a Llama-7B-shaped model; then latency and throughput.

    python benchmarks/eval_speed.py                 # GPU: Llama-2-7B shapes, bf16
    python benchmarks/eval_speed.py --tiny          # CPU smoke test of the script itself

The model is randomly initialised (no hub on the GPU machines), which changes no
timing: the work of a forward pass depends on the shapes, not the weights. Its
perplexity is near the vocabulary size, as a random model's is; the two methods must
agree on it. The plain references are the textbook loops:

- ``plain b=1``: Hugging Face's perplexity guide, one window per forward,
  ``model(input_ids, labels=...)``, the loss times the scored tokens;
- ``plain b=B``: the same windows stacked B at a time, full logits in float32,
  ``cross_entropy`` over the scored positions.

Prints a Markdown table: seconds (median of --repeats), scored tokens per second, the
perplexity of each method and llmpress's time as a fraction of the plain one's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def import_llmpress() -> None:
    """Use the installed package, or this checkout's folders where it is not installed (device)."""
    try:
        import llmpress.components  # noqa: F401
    except ImportError:
        for name, folder in (("llmpress", "pipelines"), ("llmpress.components", "components"), ("llmpress.components.stages", "components/stages")):
            module = types.ModuleType(name)
            module.__path__ = [str(ROOT / folder)]
            sys.modules[name] = module


def build_model(tiny: bool, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        shape = {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4}
    else:  # Llama-2-7B
        shape = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}
    config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=4096)
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def windows_of(n: int, seq_len: int, stride: int, count: int) -> list[tuple[int, int, int]]:
    from llmpress.components.stages.evaluate import sliding_windows

    return sliding_windows(n, seq_len, stride, count)


def plain_hf_guide(model, ids: torch.Tensor, seq_len: int, stride: int, count: int, device: str) -> float:
    """Hugging Face's perplexity guide, verbatim in spirit: one window per forward."""
    nlls, n_tokens, prev_end = [], 0, 0
    for begin, end, _ in windows_of(len(ids), seq_len, stride, count):
        trg_len = end - prev_end
        input_ids = ids[begin:end].unsqueeze(0).to(device)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())
        nlls.append(loss * valid)
        n_tokens += valid
        prev_end = end
    return math.exp((torch.stack(nlls).sum() / n_tokens).item())


def plain_batched(model, ids: torch.Tensor, seq_len: int, stride: int, count: int, batch: int, device: str) -> float:
    """The same windows B at a time: full logits, float32, cross-entropy over scored positions."""
    wins = windows_of(len(ids), seq_len, stride, count)
    total, n_tokens = 0.0, 0
    for i in range(0, len(wins), batch):
        chunk = wins[i : i + batch]
        width = max(e - b for b, e, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (b, e, first) in enumerate(chunk):
            x[r, : e - b] = ids[b:e]
            y[r, first : e - b] = ids[b + first : e]
        with torch.no_grad():
            logits = model(x.to(device)).logits.float()
        y = y.to(device)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100, reduction="sum").item()
        n_tokens += int((y[:, 1:] != -100).sum())
    return math.exp(total / n_tokens)


def timed(fn, repeats: int, device: str) -> tuple[float, float]:
    """(median seconds, result) after one warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, times nothing of interest")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=32, help="windows scored per case")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import_llmpress()
    from llmpress.components.stages.evaluate import device_label, perplexity
    from llmpress.components.stages.evaluate.speed import latency

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    seq_len = 64 if args.tiny else args.seq_len
    load = time.perf_counter()
    model = build_model(args.tiny, device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {next(model.parameters()).dtype}, "
          f"random init in {time.perf_counter() - load:.0f} s; device {device_label(device)}; torch {torch.__version__}", flush=True)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (seq_len * args.windows + 1,), generator=torch.Generator().manual_seed(1))
    stream = ids.tolist()
    rows, figures = [], {"device": device_label(device), "torch": torch.__version__, "cases": []}
    for label, stride in (("disjoint", seq_len), ("overlap 1/2", seq_len // 2)):
        count = args.windows if stride == seq_len else 2 * args.windows  # the same tokens scored
        ours_s, (ours_ppl, scored, _) = timed(lambda s=stride, c=count: perplexity(model, stream, seq_len, s, c, args.batch_size, device), args.repeats, device)
        b1_s, b1_ppl = timed(lambda s=stride, c=count: plain_hf_guide(model, ids, seq_len, s, c, device), args.repeats, device)
        bb_s, bb_ppl = timed(lambda s=stride, c=count: plain_batched(model, ids, seq_len, s, c, args.batch_size, device), args.repeats, device)
        shape = f"{count} windows of {seq_len}, stride {stride}, {scored} tokens scored"
        for method, secs, ppl in (("llmpress", ours_s, ours_ppl), ("plain b=1", b1_s, b1_ppl), (f"plain b={args.batch_size}", bb_s, bb_ppl)):
            rows.append((label, shape, method, secs, scored / secs, ppl, ours_s / secs))
            figures["cases"].append({"case": label, "shape": shape, "method": method, "seconds": secs, "tokens_per_s": scored / secs, "perplexity": ppl})
        print(f"{label}: done", flush=True)
    print("\n| case | shape | method | seconds | tokens/s | perplexity | llmpress time / this |")
    print("|---|---|---|---:|---:|---:|---:|")
    for label, shape, method, secs, tps, ppl, ratio in rows:
        print(f"| {label} | {shape} | {method} | {secs:.3f} | {tps:,.0f} | {ppl:.2f} | {ratio:.2f} |")
    lat = latency(model, [1, 8], 16 if args.tiny else 512, 8 if args.tiny else 64, args.repeats, device)
    figures["latency"] = lat
    print(f"\nlatency on {device_label(device)} (greedy, KV cache, random prompt; b = batch, in = prompt tokens, out = generated tokens):\n")
    print("| figure | value |\n|---|---:|")
    for key, value in lat.items():
        print(f"| {key} | {value:,.2f} |")
    if device == "cuda":
        print(f"\npeak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
