"""Measurements every stage shares: peak memory and the reload self-check."""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, int]]:
    """Peak bytes while the block runs: GPU memory on CUDA, else the process's peak RSS."""
    import torch

    result = {"bytes": 0}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        yield result
        result["bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        yield result
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["bytes"] = int(rss if sys.platform == "darwin" else rss * 1024)


def self_check(model_dir: str | Path, device: str, max_new_tokens: int = 8) -> str:
    """Reload with plain transformers and generate: a stage never reports success on a
    model that cannot be served."""
    from llmpress.components.models.io import load_model

    model, tokenizer = load_model(model_dir, device=device)
    return check_generates(model, tokenizer, device, model_dir, max_new_tokens)


def check_generates(model: Any, tokenizer: Any, device: str, model_dir: str | Path, max_new_tokens: int = 8) -> str:
    """The self-check on a model already reloaded from ``model_dir`` with plain
    transformers (a stage that needs the reload anyway spares a second one)."""
    import torch

    inputs = tokenizer("The", return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    if out.shape[-1] <= inputs["input_ids"].shape[-1]:
        raise RuntimeError(f"self-check: the model in {model_dir} reloaded but generated nothing")
    return tokenizer.decode(out[0], skip_special_tokens=True)
