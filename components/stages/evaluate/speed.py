"""Latency and throughput of a loaded model, on the device it sits on.

For each batch size: a random prompt of ``prompt_tokens`` tokens (fixed seed), one
forward pass over it (the prefill: **time to first token**), then ``new_tokens - 1``
greedy decode steps through the KV cache (**per-token decode**). **Throughput** is
generated tokens per second over the whole request, prefill included:
``batch * new_tokens / total``. One warm-up, then the median of ``repeats`` runs.

Every key names its shapes: ``ttft_ms.b8.in128`` is batch 8, 128 prompt tokens;
``decode_ms_per_token.b8.in128.out32`` and ``throughput_tok_s.b8.in128.out32`` add 32
generated tokens. The device is in the evaluation's ``eval_device``.
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any


def shape_label(batch: int, prompt_tokens: int, new_tokens: int | None = None) -> str:
    """'b8.in128' or 'b8.in128.out32': the shapes a figure was measured at."""
    return f"b{batch}.in{prompt_tokens}" + (f".out{new_tokens}" if new_tokens is not None else "")


def latency(model: Any, batch_sizes: list[int], prompt_tokens: int, new_tokens: int, repeats: int, device: str, seed: int = 0) -> dict[str, float]:
    """Time to first token (ms), per-token decode (ms) and throughput (tokens/s) per batch size."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    out: dict[str, float] = {}
    for batch in batch_sizes:
        prompt = torch.randint(0, vocab, (batch, prompt_tokens), generator=generator).to(device)
        _timed_request(model, prompt, min(new_tokens, 2), device)  # warm-up: kernels, allocator, caches
        runs = [_timed_request(model, prompt, new_tokens, device) for _ in range(repeats)]
        ttft = statistics.median(r[0] for r in runs)
        total = statistics.median(r[1] for r in runs)
        decode = statistics.median((r[1] - r[0]) / (new_tokens - 1) for r in runs)
        out[f"ttft_ms.{shape_label(batch, prompt_tokens)}"] = 1000 * ttft
        out[f"decode_ms_per_token.{shape_label(batch, prompt_tokens, new_tokens)}"] = 1000 * decode
        out[f"throughput_tok_s.{shape_label(batch, prompt_tokens, new_tokens)}"] = batch * new_tokens / total
    return out


def _timed_request(model: Any, prompt: Any, new_tokens: int, device: str) -> tuple[float, float]:
    """(seconds to the first token, seconds to the last), greedy with a KV cache."""
    import torch

    # serving engines compute only the last position's logits in the prefill
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, **extra)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        first = time.perf_counter() - start
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        return first, time.perf_counter() - start


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
