"""Measurements every stage shares: peak memory, whether a model fits a device whole,
and the reload self-check."""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Room a model needs on the device besides its weights. The forwards run whole here (the
# prune stage's 128-token latency, the self-check's short generate) hold tens of MB of
# activations even at a 128k vocabulary (logits 128 x 128,256 x 2 bytes = 33 MB); the rest
# is for CUDA's workspaces and the caching allocator, which rounds each of a model's
# hundreds of tensors up to its blocks.
HEADROOM_BYTES = 2**30
HEADROOM_FRACTION = 0.02


def headroom_bytes(weights_bytes: int) -> int:
    """Device memory a model of ``weights_bytes`` needs besides its weights to run a forward."""
    return HEADROOM_BYTES + int(HEADROOM_FRACTION * weights_bytes)


def fits_on_device(weights_bytes: int, available: int) -> bool:
    """Whether a model of ``weights_bytes`` can be placed where ``available`` bytes are
    free and still run a forward pass."""
    return weights_bytes + headroom_bytes(weights_bytes) <= available


def unfit_reason(weights_bytes: int, available: int | None, device: str) -> str | None:
    """Why a model of ``weights_bytes`` cannot run whole on ``device``, where ``available``
    bytes are free (None: it can). ``available`` None means no limit to check: on the CPU
    the stage held the model already."""
    if available is None or fits_on_device(weights_bytes, available):
        return None
    return (f"the model's {weights_bytes / 2**30:.1f} GiB of weights and {headroom_bytes(weights_bytes) / 2**30:.1f} GiB of headroom "
            f"for a forward pass exceed the {available / 2**30:.1f} GiB free on {device}")


def free_bytes(device: str) -> int | None:
    """Bytes this process could still place on ``device``: the device's free memory and
    the blocks its own allocator holds unused. None on the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


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
