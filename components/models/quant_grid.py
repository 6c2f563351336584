"""Settings of the integer weight grid shared by post-training quantization (quantize)
and quantization-aware fine-tuning (finetune's qat), so both accept the same values,
and the check that a group size fits a model's layers before any expensive work."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Annotated, Any

from llmpress.components.errors import UserError
from pydantic import AfterValidator

GROUP_SIZES = (-1, 32, 64, 128, 256)
# What ``auto`` picks from, best first: 128 is the size every published W4A16 result and
# kernel uses; smaller groups fit more shapes (SmolLM2's 576-wide layers take 64, not
# 128) at a few more bits of scales. 256 is never chosen for the user: it saves 0.06
# bits/parameter over 128 and loses quality (docs/quantization.md, "Group size").
AUTO_GROUP_SIZES = (128, 64, 32)


def _check_group_size(value: int) -> int:
    if value not in GROUP_SIZES:
        raise ValueError("allowed: 32, 64, 128, 256, or -1 (per output channel)")
    return value


def _check_group_size_or_auto(value: int | str) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value in GROUP_SIZES):
        return value
    raise ValueError("allowed: 32, 64, 128, 256, or -1 (per output channel), or 'auto' (the largest of 128, 64, 32 that divides every quantized layer)")


GroupSize = Annotated[int, AfterValidator(_check_group_size)]
GroupSizeOrAuto = Annotated[int | str, AfterValidator(_check_group_size_or_auto)]


def fitting_group_sizes(widths: Iterable[int]) -> list[int]:
    """The group sizes (largest first, -1 last) that divide every one of ``widths``."""
    widths = set(widths)
    return [g for g in sorted(GROUP_SIZES, reverse=True) if g == -1 or all(w % g == 0 for w in widths)]


def resolve_group_size(requested: int | str, layers: dict[str, int], field: str = "group_size") -> int:
    """The group size to quantize ``layers`` ({name: input width}) with: ``requested``
    if it divides every width, the best of ``AUTO_GROUP_SIZES`` that does for 'auto'.
    A size that does not fit is one line naming the widths, their layers and the sizes
    that would fit (quantizing would fail inside llm-compressor, after calibration)."""
    fitting = fitting_group_sizes(layers.values())
    if requested == "auto":
        return next((g for g in AUTO_GROUP_SIZES if g in fitting), -1)
    if requested == -1 or requested in fitting:
        return int(requested)
    by_width: dict[int, list[str]] = defaultdict(list)
    for name, width in layers.items():
        if width % int(requested):
            by_width[width].append(name)
    misfits = "; ".join(f"{len(names)} layer{'s' * (len(names) > 1)} {width} wide ({_examples(names)})" for width, names in sorted(by_width.items()))
    allowed = ", ".join(str(g) for g in fitting)
    raise UserError.field(field, requested, f"does not divide the input width of {misfits}; sizes that fit every quantized layer: {allowed}, or auto")


def _examples(names: list[str]) -> str:
    return ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")


def quantized_widths(model: Any, ignore: Iterable[str]) -> dict[str, int]:
    """{name: input width} of the Linear layers a quantize stage quantizes (all but ``ignore``, exact names)."""
    import torch

    skipped = set(ignore)
    return {name: module.in_features for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name not in skipped}
