"""The prune stage's forward latency before and after, and where it can be measured.

Timing a forward pass needs the whole model on the stage's device, while pruning
(sparsegpt, wanda, magnitude) keeps it on the CPU so that a model larger than the GPU
still prunes. So the latency is measured only where the model fits the device's free
memory (``skip_reason``), each model loaded there for it and dropped after.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from llmpress.components.models.io import free_memory, load_model

# The fixed forward pass timed before and after: one sequence of this many tokens.
LATENCY_TOKENS = 128
# Room a model needs on the device besides its weights. At 128 tokens a forward's
# activations and the self-check's generate are tens of MB even at a 128k vocabulary
# (logits 128 x 128,256 x 2 bytes = 33 MB); the rest is for CUDA's workspaces and the
# caching allocator, which rounds each of a model's hundreds of tensors up to its blocks.
HEADROOM_BYTES = 2**30
HEADROOM_FRACTION = 0.02


def headroom_bytes(weights_bytes: int) -> int:
    """Device memory a model of ``weights_bytes`` needs besides its weights to run a forward."""
    return HEADROOM_BYTES + int(HEADROOM_FRACTION * weights_bytes)


def fits_on_device(weights_bytes: int, free_bytes: int) -> bool:
    """Whether a model of ``weights_bytes`` can be placed where ``free_bytes`` are free
    and still run a forward pass."""
    return weights_bytes + headroom_bytes(weights_bytes) <= free_bytes


def skip_reason(weights_bytes: int, free_bytes: int | None, device: str) -> str | None:
    """Why the latency is not measured on ``device`` (None: it is). ``free_bytes`` None
    means no limit to check: on the CPU the stage held the model already."""
    if free_bytes is None or fits_on_device(weights_bytes, free_bytes):
        return None
    return (f"the model's {weights_bytes / 2**30:.1f} GiB of weights and {headroom_bytes(weights_bytes) / 2**30:.1f} GiB of headroom "
            f"for a forward pass exceed the {free_bytes / 2**30:.1f} GiB free on {device}")


def free_bytes(device: str) -> int | None:
    """Bytes this process could still place on ``device``: the device's free memory and
    the blocks its own allocator holds unused. None on the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


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
