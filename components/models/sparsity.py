"""Weight sparsity: measure it, check N:M patterns, and keep it through later stages.

Shared by the prune stage (which reports what it made) and the quantize stage (which
must not undo it): llm-compressor 0.14's GPTQ spreads each column's rounding error
over the columns after it, zeros included, so a 2:4 model comes out dense
(vllm-project/llm-compressor#2860 removed the mask-preserving code from GPTQ; seen
here: 12,095 of 98,304 groups of four broke 2:4 on the tiny Llama). ``keep_zeros``
puts the zeros back after every forward of a sparse layer, so each layer is
calibrated on the masked outputs of the layers before it, and once more at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any

# A Linear counts as pruned above this fraction of exact zeros (as sparseml did):
# dense trained weights are practically never exactly zero.
SPARSE_THRESHOLD = 0.05


def decoder_layers(model: Any) -> Any:
    """The ModuleList of transformer blocks (``model.model.layers`` for Llama, Mistral, Qwen2)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers; not a decoder-only LM of the Llama family")
    return layers


def linear_weights(module: Any) -> Iterator[tuple[str, Any]]:
    """(name, Linear) for every Linear inside ``module``."""
    import torch

    for name, child in module.named_modules():
        if isinstance(child, torch.nn.Linear):
            yield name, child


def zero_count(module: Any) -> tuple[int, int]:
    """(exact zeros, weights) over the weights of every Linear inside ``module``, read one
    at a time (in a model offloaded by llm-compressor each read is an onloaded copy)."""
    zeros = total = 0
    for _, linear in linear_weights(module):
        weight = linear.weight.detach()
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros, total


def nm_violations(weight: Any, n: int, m: int) -> int:
    """Groups of ``m`` consecutive weights along the input dimension holding fewer than
    ``n`` zeros (0 means the weight follows the N:M pattern exactly)."""
    rows, cols = weight.shape
    if cols % m:
        return rows * (cols // m + 1)
    zeros = (weight.detach().reshape(rows, cols // m, m) == 0).sum(-1)
    return int((zeros < n).sum())


def layer_report(model: Any, pattern: tuple[int, int] | None = None, skip: Collection[Any] = ()) -> list[dict[str, Any]]:
    """Per decoder layer: fraction of zero weights in its Linears (those in ``skip``, left
    dense on purpose, aside), and with ``pattern`` (N, M) the number of groups that break it."""
    report = []
    for index, layer in enumerate(decoder_layers(model)):
        zeros = total = broken = 0
        for _, linear in linear_weights(layer):
            if linear in skip:
                continue
            w = linear.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
            if pattern:
                broken += nm_violations(w, *pattern)
        entry: dict[str, Any] = {"layer": index, "sparsity": zeros / total if total else 0.0}
        if pattern:
            entry["nm_violations"] = broken
        report.append(entry)
    return report


def zero_masks(model: Any, threshold: float = SPARSE_THRESHOLD) -> dict[Any, Any]:
    """{Linear: bool mask of its non-zero weights} for every Linear that is sparse."""
    masks = {}
    for _, linear in linear_weights(model):
        nonzero = linear.weight.detach() != 0
        if 1 - nonzero.float().mean().item() > threshold:
            masks[linear] = nonzero
    return masks


@contextlib.contextmanager
def keep_zeros(model: Any, threshold: float = SPARSE_THRESHOLD) -> Iterator[int]:
    """Inside the block, a sparse Linear's pruned weights are zeroed again before each of
    its forward passes; on exit, once more. Yields how many Linears are kept sparse."""
    import torch

    masks = zero_masks(model, threshold)

    def reapply(module: Any, _args: Any) -> None:
        with torch.no_grad():
            module.weight.mul_(masks[module].to(module.weight.device))

    handles = [linear.register_forward_pre_hook(reapply) for linear in masks]
    try:
        yield len(masks)
    finally:
        for handle in handles:
            handle.remove()
        for linear in masks:
            reapply(linear, None)
