"""Quantization: one config, one ``run()``, any scheme.

``gptq-w4a16`` goes through llm-compressor's ``GPTQModifier`` and ``oneshot`` and is
saved in compressed-tensors format, which plain ``transformers`` reloads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from llmpress.components.data import DataSpec, calibration_samples
from llmpress.components.errors import UserError
from llmpress.components.measure import peak_memory, self_check
from llmpress.components.modelio import count_parameters, load_model, pick_device, save_model, weights_size_bytes
from llmpress.components.sparsity import keep_zeros
from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

Scheme = Literal["gptq-w4a16", "awq-w4a16", "w8a8", "fp8", "int8", "nf4", "fp4"]
BUILT_SCHEMES = ("gptq-w4a16",)


class QuantizeConfig(BaseModel):
    """Settings of a quantize stage; the defaults suit most decoder-only LMs."""

    model_config = ConfigDict(extra="forbid")

    scheme: Scheme = Field(description="quantization technique")
    group_size: int = Field(128, description="weights per scale: 32, 64, 128, 256, or -1 for one scale per output channel")
    symmetric: bool = Field(True, description="symmetric (no zero point) or asymmetric weights")
    actorder: Literal["static", "group", "weight"] | None = Field(None, description="GPTQ activation ordering")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening, fraction of the mean diagonal")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="modules kept in 16-bit: names or 're:REGEX'")
    calibration: DataSpec | None = Field(None, description="calibration data; default: the recipe's data.calibration")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to quantize")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value not in (-1, 32, 64, 128, 256):
            raise ValueError("allowed: 32, 64, 128, 256, or -1 (per output channel)")
        return value


def run(model_dir: str | Path, out_dir: str | Path, config: QuantizeConfig, calibration: DataSpec, texts: list[str]) -> dict[str, Any]:
    """Quantize the model at ``model_dir`` into ``out_dir``; return its metrics."""
    if config.scheme not in BUILT_SCHEMES:
        raise UserError.field("scheme", config.scheme, f"not built yet in this version; built: {', '.join(BUILT_SCHEMES)}")
    device = pick_device(config.device)
    start = time.time()
    model, tokenizer = load_model(model_dir, dtype="auto", device=device)
    num_parameters = count_parameters(model)
    samples = calibration_samples(calibration, tokenizer, texts)
    with peak_memory(device) as peak:
        # a pruned model stays pruned (2:4 stays 2:4): GPTQ alone would fill the zeros in
        with keep_zeros(model):
            _gptq(model, config, samples)
    save_model(model, tokenizer, out_dir, save_compressed=True)
    del model
    self_check(out_dir, device)
    size = weights_size_bytes(out_dir)
    return {
        "size_bytes": size,
        "num_parameters": num_parameters,
        "bits_per_parameter": 8 * size / num_parameters,
        "calibration_samples": len(samples),
        "calibration_seq_len": calibration.seq_len,
        "wall_time_s": time.time() - start,
        "peak_memory_bytes": peak["bytes"],
    }


def _gptq(model: Any, config: QuantizeConfig, samples: list[list[int]]) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=config.symmetric,
        strategy="group" if config.group_size > 0 else "channel",
        group_size=config.group_size if config.group_size > 0 else None,
        **({"actorder": config.actorder} if config.actorder else {}),
    )
    modifier = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=config.ignore, dampening_frac=config.dampening_frac,
        **({"actorder": config.actorder} if config.actorder else {}),
    )
    dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    oneshot(
        model=model, dataset=dataset, recipe=modifier, max_seq_length=max(len(s) for s in samples),
        num_calibration_samples=len(samples), shuffle_calibration_samples=False,
    )
