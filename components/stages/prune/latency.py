"""The prune stage's forward latency before and after, and where it can be measured.

Timing a forward pass needs the whole model on the stage's device, while pruning
(sparsegpt, wanda, magnitude) keeps it on the CPU so that a model larger than the GPU
still prunes. So the latency is measured only where the model fits the device's free
memory (``measure.unfit_reason``), each model loaded there for it and dropped after.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from llmpress.components.models.io import free_memory, load_model

# The fixed forward pass timed before and after: one sequence of this many tokens.
LATENCY_TOKENS = 128


def model_latency(model_dir: str | Path, device: str) -> float:
    """``forward_latency`` of the model at ``model_dir``, loaded on ``device`` for it and freed after."""
    model, _ = load_model(model_dir, device=device)
    seconds = forward_latency(model, device)
    del model
    free_memory(device)
    return seconds


def forward_latency(model: Any, device: str, tokens: int = LATENCY_TOKENS, repeats: int = 10) -> float:
    """Median seconds of one forward pass over a fixed sequence (seeded random token ids)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator).to(device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):  # two warm-ups: kernel selection and caches stay out
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)
