"""The smallest a quantized checkpoint can be: the size check every llm-compressor run reports.

Floor = the quantized weights at their bit width + one 16-bit scale per group (and a
zero point at the weight's width where the scheme is asymmetric) + every other
parameter (embeddings, norms, the Linear layers kept 16-bit) at 16 bits. A checkpoint
far above it carries something it should not (an unpacked or duplicated tensor, a
tied table saved twice); ``over_floor`` is reported with every run.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

# weight bits, and how many weights share a scale: "group" (the stage's group_size) or "channel"
SCHEME_GRIDS: dict[str, tuple[int, str]] = {
    "rtn-w4a16": (4, "group"),
    "gptq-w4a16": (4, "group"),
    "awq-w4a16": (4, "group"),
    "w8a8": (8, "channel"),
    "fp8": (8, "channel"),
}
SCALE_BITS = 16
GOAL = 0.03  # the goal: within 3% of the floor


def size_floor_bytes(model: Any, quantized: Collection[str], scheme: str, group_size: int = -1, zero_points: bool = False) -> int:
    """Bytes of the smallest checkpoint of ``model`` with the Linear layers named in
    ``quantized`` stored as ``scheme`` and every other parameter at 16 bits.
    ``group_size`` applies to group schemes (-1: one scale per output channel);
    ``zero_points``: one per scale, at the weight's bit width (asymmetric schemes)."""
    import torch

    bits, grid = SCHEME_GRIDS[scheme]
    per_scale = group_size if grid == "group" and group_size > 0 else None
    quantized_weights: set[int] = set()
    total_bits = 0
    for name, module in model.named_modules():
        if name in quantized and isinstance(module, torch.nn.Linear):
            rows, cols = module.out_features, module.in_features
            scales = rows * (math.ceil(cols / per_scale) if per_scale else 1)
            total_bits += rows * cols * bits + scales * (SCALE_BITS + (bits if zero_points else 0))
            quantized_weights.add(id(module.weight))
    seen: set[int] = set(quantized_weights)
    for _, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen:  # a tied table is stored once
            seen.add(id(param))
            total_bits += param.numel() * 16
    return math.ceil(total_bits / 8)


def over_floor(size_bytes: int, floor_bytes: int) -> float:
    """How far a checkpoint is above its floor, as a fraction (0.01 = 1% larger)."""
    return size_bytes / floor_bytes - 1
