"""Pruning: one config, one ``run()``, four methods.

- ``sparsegpt``, ``wanda``: llm-compressor's ``SparseGPTModifier`` / ``WandaPruningModifier``
  through ``oneshot``, layer by layer on calibration data; unstructured (a target
  sparsity, optionally one per layer) or N:M (``2:4``: 2 of every 4 consecutive weights
  along the input dimension are zero, the pattern sparse tensor cores run).
- ``magnitude``: the smallest |w| of each Linear are zeroed, with llm-compressor's
  unstructured magnitude mask (``PruningMaskFactory``); its ``MagnitudePruningModifier``
  applies masks only inside a training loop, so under ``oneshot`` it leaves the weights
  as they were. N:M magnitude masks are written here (no library mask does N:M).
- ``structured``: whole attention heads and FFN channels are removed and the model
  becomes smaller and dense (``prune_structured``).

Unstructured and N:M sparsity keep the tensor shapes (zeros are stored; dense PyTorch
runs no faster); structured pruning shrinks them. Every run reports per-layer
sparsity or removed heads/channels, parameter count, size, and the latency of a fixed
forward pass before and after (``latency``: where the whole model fits the device).

Only ``structured`` holds the whole model on the GPU while it prunes; the others keep
it on the CPU and need one decoder layer (sparsegpt, wanda) or one Linear (magnitude)
on the GPU at a time (``weights_home``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Literal

from llmpress.components.data import DataSpec, calibration_samples
from llmpress.components.errors import UserError
from llmpress.components.models.calibrated import calibrate
from llmpress.components.models.calibrated import release as release_calibrated
from llmpress.components.models.io import count_parameters, free_memory, load_model, loaded_bytes, pick_device, save_model, weights_size_bytes
from llmpress.components.models.measure import check_generates, free_bytes, peak_memory, unfit_reason
from llmpress.components.models.sparsity import decoder_layers, layer_report, linear_weights, zero_count
from llmpress.components.stages.prune import latency as prune_latency
from llmpress.components.stages.prune import structured as prune_structured
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

log = logging.getLogger(__name__)

UNSTRUCTURED = ("sparsegpt", "wanda", "magnitude")
DEFAULT_SPARSITY = 0.5


class PruneConfig(BaseModel):
    """Settings of a prune stage. Fields marked (structured) or (unstructured) belong to
    those methods only; giving one to the other kind is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["sparsegpt", "wanda", "magnitude", "structured"] = Field(description="pruning technique")
    sparsity: float | None = Field(None, gt=0, lt=1, description="fraction of weights zeroed per layer (unstructured, default 0.5); "
                                   "structured: fraction of heads and of FFN channels removed unless attention_sparsity/ffn_sparsity say otherwise")
    mask_structure: str = Field("0:0", description="(unstructured) 'N:M': N of every M consecutive weights are zero, e.g. '2:4'; '0:0' for unstructured")
    layer_sparsity: list[float] | None = Field(None, description="(unstructured) one sparsity per decoder layer, replacing `sparsity`")
    keep_layers: list[int] = Field(default_factory=list, description="(unstructured) decoder layers left intact, by index")
    ignore: list[str] = Field(default_factory=list, description="(unstructured) Linears left dense: names or 're:REGEX'")
    attention_sparsity: float | None = Field(None, ge=0, lt=1, description="(structured) fraction of key/value groups removed per layer")
    ffn_sparsity: float | None = Field(None, ge=0, lt=1, description="(structured) fraction of FFN channels removed per layer")
    target_parameters: int | None = Field(None, gt=0, description="(structured) parameter count of the output; FFN channels are removed to reach it")
    channel_multiple: int = Field(8, gt=0, le=1024, description="(structured) the kept FFN width is a multiple of this (64 or 128 suit GPU kernels)")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="(sparsegpt) Hessian dampening, fraction of the mean diagonal")
    calibration: DataSpec | None = Field(None, description="calibration data; default: the recipe's data.calibration")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to prune")

    @field_validator("mask_structure")
    @classmethod
    def _mask_structure(cls, value: str, info: ValidationInfo) -> str:
        if value == "0:0":
            return value
        if info.data.get("method") == "structured":
            raise ValueError("only for methods sparsegpt, wanda, magnitude; structured removes whole heads and channels")
        match = re.fullmatch(r"(\d+):(\d+)", value)
        if not match or not 0 < int(match[1]) < int(match[2]) <= 64:
            raise ValueError("allowed: '0:0' (unstructured) or 'N:M' with 0 < N < M <= 64, such as '2:4'")
        sparsity = info.data.get("sparsity")
        if sparsity is not None and abs(sparsity - int(match[1]) / int(match[2])) > 1e-9:
            raise ValueError(f"fixes the sparsity at {int(match[1]) / int(match[2]):g}, but sparsity is {sparsity:g}; drop one of them")
        return value

    @field_validator("layer_sparsity")
    @classmethod
    def _layer_sparsity(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if value is None:
            return value
        cls._unstructured_only(info)
        if info.data.get("mask_structure", "0:0") != "0:0":
            raise ValueError("an N:M mask_structure fixes every layer's sparsity; drop one of them")
        if info.data.get("sparsity") is not None:
            raise ValueError("replaces sparsity; give one of them")
        if not value or any(not 0 <= s < 1 for s in value):
            raise ValueError("one value per decoder layer, each in [0, 1)")
        return value

    @field_validator("keep_layers", "ignore")
    @classmethod
    def _unstructured_lists(cls, value: list[Any], info: ValidationInfo) -> list[Any]:
        if value:
            cls._unstructured_only(info)
        if info.field_name == "keep_layers" and any(i < 0 for i in value):
            raise ValueError("decoder layer indices, 0 or more")
        return value

    @field_validator("attention_sparsity", "ffn_sparsity", "channel_multiple")
    @classmethod
    def _structured_only(cls, value: Any, info: ValidationInfo) -> Any:
        if info.data.get("method", "structured") != "structured":
            raise ValueError(f"only for method structured (method is {info.data['method']!r})")
        return value

    @field_validator("target_parameters")
    @classmethod
    def _target(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("ffn_sparsity") is not None:
            raise ValueError("sets the FFN width, as ffn_sparsity does; give one of them")
        return cls._structured_only(value, info)

    @model_validator(mode="after")
    def _structured_amount(self) -> PruneConfig:
        amounts = (self.sparsity, self.attention_sparsity, self.ffn_sparsity, self.target_parameters)
        if self.method == "structured" and all(a is None for a in amounts):
            raise ValueError("method 'structured' needs how much to remove: sparsity, attention_sparsity, ffn_sparsity or target_parameters")
        return self

    @staticmethod
    def _unstructured_only(info: ValidationInfo) -> None:
        if info.data.get("method") == "structured":
            raise ValueError("only for methods sparsegpt, wanda, magnitude; structured prunes every layer alike")

    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M mask, or None for unstructured."""
        n, m = (int(x) for x in self.mask_structure.split(":"))
        return (n, m) if m else None


def run(model_dir: str | Path, out_dir: str | Path, config: PruneConfig, calibration: DataSpec, texts: list[str]) -> dict[str, Any]:
    """Prune the model at ``model_dir`` into ``out_dir``; return its metrics.

    ``prune_time_s`` is the work a direct llm-compressor call also does (load, prune,
    save); the latency before, the reload self-check and the figures of the output are
    ``measure_time_s``, apart. The model is pruned where ``weights_home`` says; the
    latencies need it whole on the device and are measured only where it fits
    (otherwise ``latency_skipped`` says why, and the self-check runs on the CPU)."""
    device = pick_device(config.device)
    home = weights_home(config.method, device)
    # structured runs whole forwards on the device: a model that cannot fit there is one
    # line before the load, not an out-of-memory error after it
    unfit = unfit_reason(loaded_bytes(model_dir), free_bytes(home), home) if config.method == "structured" else None
    if unfit:
        raise UserError.field("method", config.method, f"structured pruning runs the whole model on {home}: {unfit}; give the step more GPU "
                              "memory, or use sparsegpt, wanda or magnitude (they keep the model on the CPU)")
    start = time.time()
    model, tokenizer = load_model(model_dir, dtype="auto", device=home)
    load_s = time.time() - start
    params_before = count_parameters(model)
    phase = time.time()
    samples = calibration_samples(calibration, tokenizer, texts) if config.method != "magnitude" else []
    with peak_memory(device) as peak:
        if config.method == "structured":
            metrics, detail = _structured(model, config, samples, device, params_before)
        else:
            metrics, detail = _unstructured(model, config, samples, device)
    calibrate_s = time.time() - phase
    log.info("prune: %s done in %.1f s; saving", config.method, calibrate_s)
    phase = time.time()
    save_model(model, tokenizer, out_dir)
    (Path(out_dir) / "pruning.json").write_text(json.dumps({"method": config.method, "layers": detail}))
    save_s = time.time() - phase
    log.info("prune: saved in %.1f s; measuring the input and reloading the output to check and measure it", save_s)
    del model
    if config.method in ("sparsegpt", "wanda"):
        release_calibrated(device)  # the reloads below must not come on top of it
    else:
        free_memory(device)
    measured = time.time()
    size_before = weights_size_bytes(model_dir)  # the larger of the two: the output is as large or smaller
    skipped = unfit_reason(size_before, free_bytes(device), device)
    if skipped:
        log.warning("prune: forward latency not measured: %s; the output's self-check runs on the CPU", skipped)
    # the input again, on the device for its latency only (it was never there whole while pruning)
    latency_before = None if skipped else prune_latency.model_latency(model_dir, device)
    check_device = "cpu" if skipped else device
    # one reload serves the self-check and the figures of the output (at 8B each reload is 16 GB)
    pruned, tokenizer = load_model(out_dir, device=check_device)
    check_generates(pruned, tokenizer, check_device, out_dir)
    latency_after = None if skipped else prune_latency.forward_latency(pruned, device)
    params_after = count_parameters(pruned)
    zeros, decoder_weights = zero_count(decoder_layers(pruned))
    nonzero = params_after - zeros
    if config.method in UNSTRUCTURED:  # counted here, on the output, not on the pruned model, where each read onloads a copy
        metrics["decoder_sparsity"] = zeros / decoder_weights
    del pruned
    measure_s = time.time() - measured
    if latency_before is None or latency_after is None:
        latency: dict[str, Any] = {"latency_skipped": skipped}
        log.info("pruned with %s: %d -> %d parameters (%d non-zero)", config.method, params_before, params_after, nonzero)
    else:
        latency = {"latency_ms_before": latency_before * 1e3, "latency_ms_after": latency_after * 1e3, "forward_speedup": latency_before / latency_after}
        log.info("pruned with %s: %d -> %d parameters (%d non-zero), forward %.2f -> %.2f ms",
                 config.method, params_before, params_after, nonzero, latency_before * 1e3, latency_after * 1e3)
    return {
        **metrics,
        "num_parameters_before": params_before,
        "num_parameters": params_after,
        "nonzero_parameters": nonzero,
        "size_bytes_before": size_before,
        "size_bytes": weights_size_bytes(out_dir),
        "bits_per_parameter": 8 * weights_size_bytes(out_dir) / params_after,
        **latency,
        "calibration_samples": len(samples),
        "load_time_s": load_s,
        "calibrate_time_s": calibrate_s,
        "save_time_s": save_s,
        "prune_time_s": load_s + calibrate_s + save_s,
        "measure_time_s": measure_s,
        "wall_time_s": time.time() - start,
        "peak_memory_bytes": peak["bytes"],
    }


def weights_home(method: str, device: str) -> str:
    """Where the model's weights live while ``method`` prunes it on ``device``.

    sparsegpt and wanda: on the CPU; llm-compressor onloads one decoder layer at a time
    to the GPU (``calibrated.calibrate``). magnitude: on the CPU; each Linear's mask is
    computed on the device, one Linear at a time. None of the three needs the whole
    model on the GPU, so a model larger than it prunes. structured: on the device; its
    importance pass runs the whole model forward over every calibration window."""
    return device if method == "structured" else "cpu"


# --- unstructured and N:M ----------------------------------------------------------------

def layer_schedule(config: PruneConfig, num_layers: int) -> list[float]:
    """The sparsity of every decoder layer; kept layers get 0."""
    if config.layer_sparsity is not None and len(config.layer_sparsity) != num_layers:
        raise UserError.field("layer_sparsity", config.layer_sparsity, f"needs one value per decoder layer; this model has {num_layers}")
    bad = [i for i in config.keep_layers if i >= num_layers]
    if bad:
        raise UserError.field("keep_layers", config.keep_layers, f"layer indices run 0..{num_layers - 1} in this model")
    nm = config.nm()
    default = nm[0] / nm[1] if nm else (config.sparsity or DEFAULT_SPARSITY)
    schedule = list(config.layer_sparsity or [default] * num_layers)
    return [0.0 if i in config.keep_layers else s for i, s in enumerate(schedule)]


def _unstructured(model: Any, config: PruneConfig, samples: list[list[int]], device: str = "cpu") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    layers = decoder_layers(model)
    schedule = layer_schedule(config, len(layers))
    nm = config.nm()
    if nm:
        narrow = [(name, lin.in_features) for name, lin in linear_weights(layers) if lin.in_features % nm[1]]
        if narrow:
            raise UserError.field("mask_structure", config.mask_structure, f"needs input widths divisible by {nm[1]}; {narrow[0][0]} has {narrow[0][1]}")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    # kept layers are left out by name: an N:M modifier ignores per-layer sparsities
    ignore = list(config.ignore) + [f"re:{re.escape(prefix)}\\.{i}\\." for i in config.keep_layers]
    left_dense = _matching(model, prefix, list(config.ignore))
    if config.method == "magnitude":
        _magnitude(model, schedule, nm, left_dense, device)
    else:
        _oneshot(model, config, samples, schedule, type(layers[0]).__name__, ignore)
    per_layer = layer_report(model, nm, skip=left_dense)
    for entry, target in zip(per_layer, schedule, strict=True):
        entry["target"] = target
    metrics: dict[str, Any] = {"layers": per_layer}  # decoder_sparsity: counted on the reloaded output (run)
    if nm:
        metrics["nm_violations"] = sum(e["nm_violations"] for e in per_layer)
    return metrics, per_layer


def _oneshot(model: Any, config: PruneConfig, samples: list[list[int]], schedule: list[float], layer_class: str, ignore: list[str]) -> None:
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    common = {"sparsity": schedule, "mask_structure": config.mask_structure, "targets": [layer_class], "ignore": ignore}
    if config.method == "sparsegpt":
        modifier = SparseGPTModifier(**common, dampening_frac=config.dampening_frac)
    else:
        modifier = WandaPruningModifier(**common)
    calibrate(model, modifier, samples)


def _matching(model: Any, prefix: str, ignore: list[str]) -> set[Any]:
    """The decoder-layer Linears that ``ignore`` (llm-compressor's syntax) leaves dense."""
    from compressed_tensors.utils import match_targets

    return {lin for i, layer in enumerate(decoder_layers(model)) for name, lin in linear_weights(layer) if match_targets(f"{prefix}.{i}.{name}", lin, ignore)}


def _magnitude(model: Any, schedule: list[float], nm: tuple[int, int] | None, left_dense: set[Any], device: str) -> None:
    """Zero the smallest |w| of each Linear; the mask of each is computed on ``device``
    (the sort is fast there) one Linear at a time, wherever the model lives."""
    import torch
    from llmcompressor.modifiers.pruning.utils.pytorch import PruningMaskCreatorArgs, PruningMaskFactory

    unstructured = PruningMaskFactory.create_mask_creator("unstructured")
    for i, layer in enumerate(decoder_layers(model)):
        for _, linear in linear_weights(layer):
            if schedule[i] == 0 or linear in left_dense:
                continue
            weight = linear.weight.data
            w = weight.to(device)  # ``weight`` itself when the model is on the device
            if nm:
                n, m = nm
                groups = w.abs().reshape(w.shape[0], -1, m)
                mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1, largest=False).indices, False)
                mask = mask.reshape(w.shape)
            else:
                mask = unstructured(PruningMaskCreatorArgs(parameter=w, sparsity=schedule[i], scores=w.abs()))
            with torch.no_grad():
                w.mul_(mask.to(w.dtype))
                if w is not weight:
                    weight.copy_(w)


# --- structured ----------------------------------------------------------------------------

def _structured(model: Any, config: PruneConfig, samples: list[list[int]], device: str, params_before: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    shape = prune_structured.model_shape(model)
    part_default = config.sparsity if config.target_parameters is None else None
    attention = config.attention_sparsity if config.attention_sparsity is not None else (part_default or 0.0)
    ffn = config.ffn_sparsity if config.ffn_sparsity is not None else part_default
    groups_kept, channels_kept = prune_structured.plan(model, params_before, attention, ffn, config.target_parameters, config.channel_multiple)
    attention_field = "attention_sparsity" if config.attention_sparsity is not None else "sparsity"
    attention_removed = prune_structured.check_rounding(attention_field, attention, groups_kept, shape.kv_heads, "key/value groups")
    amounts = {"attention_sparsity_asked": attention, "attention_sparsity_removed": attention_removed}
    if config.target_parameters is None:
        ffn_field = "ffn_sparsity" if config.ffn_sparsity is not None else "sparsity"
        ffn_removed = prune_structured.check_rounding(ffn_field, ffn or 0.0, channels_kept, shape.intermediate, "FFN channels")
        amounts |= {"ffn_sparsity_asked": ffn or 0.0, "ffn_sparsity_removed": ffn_removed}
    log.info("structured: removing %d of %d key/value groups (%.3g, asked %.3g) and %d of %d FFN channels per layer",
             shape.kv_heads - groups_kept, shape.kv_heads, attention_removed, attention, shape.intermediate - channels_kept, shape.intermediate)
    scores = prune_structured.importance(model, samples, device)
    kept = prune_structured.choose(scores, groups_kept, channels_kept)
    prune_structured.shrink(model, kept)
    summary, detail = prune_structured.report(shape, kept)
    metrics = {
        "heads_before": shape.heads, "heads_after": groups_kept * shape.group_size,
        "kv_heads_before": shape.kv_heads, "kv_heads_after": groups_kept,
        "intermediate_size_before": shape.intermediate, "intermediate_size_after": channels_kept,
        **amounts, "layers": summary,
    }
    return metrics, detail
