"""Settings of the integer weight grid shared by post-training quantization (quantize)
and quantization-aware fine-tuning (finetune's qat), so both accept the same values."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

GROUP_SIZES = (-1, 32, 64, 128, 256)


def _check_group_size(value: int) -> int:
    if value not in GROUP_SIZES:
        raise ValueError("allowed: 32, 64, 128, 256, or -1 (per output channel)")
    return value


GroupSize = Annotated[int, AfterValidator(_check_group_size)]
