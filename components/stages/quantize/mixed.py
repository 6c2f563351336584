"""Mixed precision for the quantize stage: which Linear layers stay 16-bit.

``resolve_ignore`` turns the recipe's ``ignore`` (exact module names or ``re:REGEX``,
matched as llm-compressor matches them) into module names. ``auto_ignore`` measures each
remaining layer's sensitivity on calibration data, as the rise of the model's
next-token loss when that layer alone has its weights rounded to the scheme's format
(round-to-nearest, the same bits, groups and scales), and then keeps the most sensitive
layers 16-bit for as long as the estimated size stays within the budget, in bits per
parameter. The estimate counts each tensor at its stored width plus the scales, zero
points and safetensors header entries the scheme adds, so the ``bits_per_parameter``
metric of the output lands at or under it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from typing import Any

from llmpress.components.errors import UserError

log = logging.getLogger("llmpress.quantize")

# 4-bit integer weights in groups, compressed-tensors' pack-quantized format
INT4_SCHEMES = ("rtn-w4a16", "gptq-w4a16", "awq-w4a16")
HEADER_BYTES_PER_TENSOR = 110  # a safetensors header entry: name, dtype, shape, offsets (measured: 100-110)


def check_pattern(pattern: str) -> str:
    """A ``re:`` pattern must compile; its error names the pattern."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as err:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({err}); allowed: a module name or 're:REGEX'") from None
    return pattern


def linear_names(model: Any) -> list[str]:
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def resolve_ignore(model: Any, patterns: list[str], strict: bool = True) -> list[str]:
    """Names of the Linear modules that ``patterns`` keep 16-bit. With ``strict``, a
    pattern that matches nothing is a UserError (a typo would silently quantize)."""
    names = linear_names(model)
    kept: list[str] = []
    for pattern in patterns:
        found = [n for n in names if _matches(pattern, n)]
        if not found and strict:
            examples = ", ".join(names[-3:])
            raise UserError.field("ignore", pattern, f"matches no Linear module of this model (names such as {examples}; 're:.*down_proj' for a regex)")
        kept += [n for n in found if n not in kept]
    return kept


def _matches(pattern: str, name: str) -> bool:
    return re.match(pattern[3:], name) is not None if pattern.startswith("re:") else pattern == name


def quantized_bits(scheme: str, in_features: int, group_size: int = 128, symmetric: bool = True, double_quant: bool = True) -> float:
    """Bits one weight of a Linear takes on disk under ``scheme``, its scales included."""
    if scheme in INT4_SCHEMES:
        group = group_size if group_size > 0 else in_features
        return 4 + (16 + (0 if symmetric else 4)) / group  # bf16 scale, packed int4 zero point
    if scheme in ("w8a8", "fp8"):
        return 8 + 16 / in_features  # per-output-channel bf16 scale
    if scheme == "int8":
        return 8 + 32 / in_features  # fp32 row statistics (SCB)
    # nf4/fp4: one absmax per 64 weights, fp32 or (double quant) uint8 with an fp32 per 256 blocks
    return 4 + (8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64)


def layer_overhead_bytes(scheme: str, symmetric: bool = True, double_quant: bool = True) -> int:
    """Bytes a quantized Linear adds whatever its size: small tensors and header entries.

    Measured on saved checkpoints: compressed-tensors adds weight_scale and weight_shape
    (and weight_zero_point when asymmetric); bitsandbytes 4-bit adds absmax, a 16-entry
    quant_map, its JSON quant_state and, with double quant, nested_absmax and a
    256-entry nested_quant_map; LLM.int8() adds SCB and weight_format."""
    if scheme in INT4_SCHEMES:
        return 16 + (2 if symmetric else 3) * HEADER_BYTES_PER_TENSOR
    if scheme in ("w8a8", "fp8"):
        return HEADER_BYTES_PER_TENSOR
    if scheme == "int8":
        return 1 + 2 * HEADER_BYTES_PER_TENSOR
    if double_quant:
        return 1024 + 64 + 200 + 5 * HEADER_BYTES_PER_TENSOR
    return 64 + 200 + 3 * HEADER_BYTES_PER_TENSOR


def fake_quantizer(scheme: str, group_size: int = 128, symmetric: bool = True, double_quant: bool = True) -> Callable[[Any], Any]:
    """weight -> the weight after round-to-nearest in ``scheme``'s format (same dtype)."""
    import torch

    def rtn_int(w: Any, bits: int, group: int, sym: bool) -> Any:
        rows, cols = w.shape
        group = group if 0 < group and cols % group == 0 else cols  # a ragged last group: per row instead
        g = w.float().reshape(rows, -1, group)
        if sym:
            scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-8) / (2 ** (bits - 1) - 1)
            q = (g / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
        else:
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
            zero = (-lo / scale).round()
            q = ((g / scale).round() + zero).clamp(0, 2**bits - 1).sub(zero) * scale
        return q.reshape(rows, cols).to(w.dtype)

    def fp8(w: Any) -> Any:
        scale = w.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / torch.finfo(torch.float8_e4m3fn).max
        return ((w.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(w.dtype)

    def bnb4(w: Any) -> Any:
        import bitsandbytes.functional as F

        q, state = F.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type=scheme, compress_statistics=double_quant)
        return F.dequantize_4bit(q, state).to(w.dtype)

    if scheme in INT4_SCHEMES:
        return lambda w: rtn_int(w, 4, group_size, symmetric)
    if scheme in ("w8a8", "int8"):
        return lambda w: rtn_int(w, 8, -1, True)
    return fp8 if scheme == "fp8" else bnb4


def _loss(model: Any, batch: Any) -> float:
    import torch

    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


def sensitivities(model: Any, names: list[str], quantize_weight: Callable[[Any], Any], samples: list[list[int]], device: str) -> dict[str, float]:
    """{layer: rise of the calibration loss when only that layer is quantized}."""
    import torch

    batch = torch.tensor(samples, device=device)
    base = _loss(model, batch)
    result = {}
    for name in names:
        module = model.get_submodule(name)
        original = module.weight.data
        module.weight.data = quantize_weight(original)
        try:
            result[name] = _loss(model, batch) - base
        finally:
            module.weight.data = original
    return result


def auto_ignore(model: Any, already: list[str], samples: list[list[int]], budget: float, num_parameters: int, device: str, *,
                scheme: str, group_size: int, symmetric: bool, double_quant: bool) -> dict[str, Any]:
    """Choose the layers to keep 16-bit. Returns ``kept`` (name, sensitivity, reason),
    ``estimated_bits_per_parameter``, ``floor_bits_per_parameter`` and ``sensitivity``."""
    candidates = [n for n in linear_names(model) if n not in already]
    bits = {n: quantized_bits(scheme, model.get_submodule(n).in_features, group_size, symmetric, double_quant) for n in candidates}
    stored = {n: 8 * model.get_submodule(n).weight.element_size() for n in candidates}
    overhead = 8 * layer_overhead_bytes(scheme, symmetric, double_quant)
    size = _estimated_bits(model, bits) + overhead * len(bits)
    floor = size / num_parameters
    if floor > budget:
        raise UserError.field("auto_ignore.budget", budget, f"below what {scheme} reaches on this model with no layer kept 16-bit "
                                                            f"(about {math.ceil(floor * 100) / 100} bits per parameter); allowed: at least that")
    placed = model.device
    model.to(device)  # measured where the stage quantizes; put back for llm-compressor's onloading
    try:
        sens = sensitivities(model, candidates, fake_quantizer(scheme, group_size, symmetric, double_quant), samples, device)
    finally:
        model.to(placed)
    ranked = sorted(candidates, key=lambda n: sens[n], reverse=True)
    kept = []
    for rank, name in enumerate(ranked, 1):
        extra = model.get_submodule(name).weight.numel() * (stored[name] - bits[name]) - overhead
        if (size + extra) / num_parameters > budget:
            log.info("quantize: %s not kept (sensitivity rank %d, +%.4g loss): would pass the budget", name, rank, sens[name])
            continue
        size += extra
        kept.append({"name": name, "sensitivity": sens[name], "reason": (
            f"auto_ignore: sensitivity rank {rank} of {len(ranked)} (quantizing it alone raises the calibration loss by {sens[name]:.4g}); "
            f"estimate {size / num_parameters:.3f} <= budget {budget} bits per parameter")})
    return {"kept": kept, "budget": budget, "estimated_bits_per_parameter": size / num_parameters,
            "floor_bits_per_parameter": floor, "sensitivity": sens}


def _estimated_bits(model: Any, quantized: dict[str, float]) -> float:
    """Bits on disk with the ``quantized`` layers at their bits per weight, every other
    tensor as stored, and one header entry each."""
    weights = {id(model.get_submodule(n).weight): b for n, b in quantized.items()}
    seen: set[int] = set()
    total = 0.0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:  # tied weights are stored once
            continue
        seen.add(id(tensor))
        total += tensor.numel() * weights.get(id(tensor), 8 * tensor.element_size()) + 8 * HEADER_BYTES_PER_TENSOR
    return total
