"""Quantization: one config, one ``run()``, any scheme.

llm-compressor schemes (``rtn-w4a16``, ``gptq-w4a16``, ``awq-w4a16``, ``w8a8``, ``fp8``) run through
``oneshot`` on a model loaded on the CPU, so its sequential pipeline onloads one decoder
layer at a time to the GPU (a model larger than GPU memory still quantizes), and are
saved in compressed-tensors format, written once right after calibration so that a
rerun after a later failure resumes without calibrating (``resume``); each run reports
its size against the floor (``floor``). bitsandbytes schemes (``int8``, ``nf4``, ``fp4``)
quantize while loading and are saved as a serialized bitsandbytes checkpoint
(``quantize_bnb``). Both reload with plain ``transformers``; the stage checks that
itself. Which Linear layers stay 16-bit is ``quantize_mixed``'s business.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from llmpress.components.data import DataSpec, calibration_samples
from llmpress.components.errors import UserError
from llmpress.components.models.calibrated import calibrate
from llmpress.components.models.calibrated import release as release_calibrated
from llmpress.components.models.io import count_parameters, load_model, loaded_bytes, pick_device, save_model, weights_size_bytes
from llmpress.components.models.measure import free_bytes, peak_memory, self_check, unfit_reason
from llmpress.components.models.quant_grid import GroupSizeOrAuto, quantized_widths, resolve_group_size
from llmpress.components.models.sparsity import SPARSE_THRESHOLD, keep_zeros, linear_weights
from llmpress.components.stages.quantize import bnb as quantize_bnb
from llmpress.components.stages.quantize import mixed as quantize_mixed
from llmpress.components.stages.quantize import resume
from llmpress.components.stages.quantize.floor import GOAL as FLOOR_GOAL
from llmpress.components.stages.quantize.floor import over_floor, size_floor_bytes
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

log = logging.getLogger("llmpress.quantize")

Scheme = Literal["rtn-w4a16", "gptq-w4a16", "awq-w4a16", "w8a8", "fp8", "int8", "nf4", "fp4"]
LLMCOMPRESSOR_SCHEMES = ("rtn-w4a16", "gptq-w4a16", "awq-w4a16", "w8a8", "fp8")
# no calibration data: weights are rounded to the nearest grid point (rtn) or scaled per token at run time (fp8)
DATA_FREE_SCHEMES = ("rtn-w4a16", "fp8")
BNB_SCHEMES = quantize_bnb.SCHEMES
DEFAULT_IGNORE = ["lm_head"]
MIXED_PRECISION_REPORT = "llmpress-mixed-precision.json"

# Settings that mean something for some schemes only: setting one for another scheme is
# a mistake worth one clear line rather than a silently ignored field.
SCHEME_FIELDS: dict[str, tuple[str, ...]] = {
    "group_size": quantize_mixed.INT4_SCHEMES,
    "symmetric": quantize_mixed.INT4_SCHEMES,
    "actorder": ("gptq-w4a16", "w8a8"),
    "dampening_frac": ("gptq-w4a16", "w8a8"),
    "smoothing_strength": ("w8a8",),
    "int8_threshold": ("int8",),
    "double_quant": ("nf4", "fp4"),
    "sequential_offload_device": ("gptq-w4a16", "awq-w4a16", "w8a8"),
}


class AutoIgnore(BaseModel):
    """Keep the layers most sensitive to quantization in 16-bit, within a size budget."""

    model_config = ConfigDict(extra="forbid")

    budget: float = Field(gt=0, le=32, description="most bits per parameter the output may take (the bits_per_parameter metric)")
    samples: int = Field(8, gt=0, le=1024, description="calibration windows used to measure each layer's sensitivity")


class QuantizeConfig(BaseModel):
    """Settings of a quantize stage; the defaults suit most decoder-only LMs."""

    model_config = ConfigDict(extra="forbid")

    scheme: Scheme = Field(description="quantization technique")
    group_size: GroupSizeOrAuto = Field("auto", description="weights per scale (gptq/awq): 32, 64, 128, 256, -1 for one scale per output "
                                        "channel, or auto: the largest of 128, 64, 32 that divides every quantized layer")
    symmetric: bool | None = Field(None, description="symmetric (no zero point) weights (rtn/gptq/awq); default: gptq symmetric, awq and rtn asymmetric")
    actorder: Literal["static", "weight"] | None = Field(None, description="GPTQ activation ordering (gptq-w4a16, w8a8)")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening, fraction of the mean diagonal (gptq-w4a16, w8a8)")
    smoothing_strength: float = Field(0.8, gt=0, lt=1, description="SmoothQuant migration strength alpha (w8a8)")
    int8_threshold: float = Field(6.0, ge=0, description="LLM.int8() outlier threshold: activations above it stay fp16 (int8; 0 = no outliers)")
    double_quant: bool = Field(True, description="quantize the 4-bit block scales too, ~0.4 bits per weight less (nf4, fp4)")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE), description="Linear modules kept in 16-bit: exact names or 're:REGEX'")
    auto_ignore: AutoIgnore | None = Field(None, description="also keep the most sensitive layers in 16-bit, within {budget: bits per parameter}")
    sequential_offload_device: Literal["cpu", "cuda"] = Field("cpu", description="where llm-compressor keeps activations between layers")
    calibration: DataSpec | None = Field(None, description="calibration data; default: the recipe's data.calibration")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to quantize")

    @field_validator(*SCHEME_FIELDS)
    @classmethod
    def _applies_to_scheme(cls, value: Any, info: ValidationInfo) -> Any:
        scheme = info.data.get("scheme")
        default = cls.model_fields[info.field_name].default
        # a dumped config carries every default, so only a changed value is a choice
        if scheme and value != default and scheme not in SCHEME_FIELDS[info.field_name]:
            raise ValueError(f"applies to scheme {', '.join(SCHEME_FIELDS[info.field_name])} only; this stage's scheme is {scheme!r}")
        return value

    @field_validator("actorder", mode="before")
    @classmethod
    def _actorder_group_removed(cls, value: Any) -> Any:
        # compressed-tensors 0.19 refuses 'group' only when the modifier is built, i.e.
        # after the model is loaded and calibration data tokenized: refuse it here
        if value == "group":
            raise ValueError("'group' was removed by compressed-tensors 0.19 (it raised inside the step, after loading); allowed: static, weight")
        return value

    @field_validator("ignore")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        return [quantize_mixed.check_pattern(p) for p in value]


def run(model_dir: str | Path, out_dir: str | Path, config: QuantizeConfig, calibration: DataSpec, texts: list[str],
        resume_key: str | None = None) -> dict[str, Any]:
    """Quantize the model at ``model_dir`` into ``out_dir``; return its metrics.

    llm-compressor schemes resume: a rerun after a failure past calibration (``resume``)
    reuses the calibrated model. ``resume_key`` names it (the step's content-addressed
    key); by default it is derived from the input's files, the settings and the text."""
    device = pick_device(config.device)
    if config.auto_ignore:  # its sensitivity pass runs the whole 16-bit model on the device: fail before loading it
        unfit = unfit_reason(loaded_bytes(model_dir), free_bytes(device), device)
        if unfit:
            raise UserError.field("auto_ignore", config.auto_ignore.model_dump(), f"its sensitivity pass needs the whole 16-bit model on {device}: {unfit}; "
                                  "drop auto_ignore (name the layers in ignore) or give the step more GPU memory")
    start = time.time()
    log.info("quantize: scheme %s on %s", config.scheme, device)
    resumable = None
    with peak_memory(device) as peak:
        if config.scheme in BNB_SCHEMES:
            extra = _run_bnb(model_dir, out_dir, config, calibration, texts, device)
        else:
            key = resume_key or resume.resume_key(model_dir, config.model_dump(mode="json"), calibration.model_dump(mode="json"), texts)
            resumable = resume.resume_root() / f"quantize-{key}"
            extra = _run_llmcompressor(model_dir, out_dir, config, calibration, texts, device, resumable)
    quantize_s = time.time() - start
    check_start = time.time()
    unfit = self_check_unfit(out_dir, config.scheme, device)
    if unfit:
        log.warning("quantize: the output's self-check runs on the CPU: its reload is 16-bit and does not fit %s: %s", device, unfit)
    sample = self_check(out_dir, "cpu" if unfit else device)
    log.info("quantize: reloaded with plain transformers and generated %r", sample[-60:])
    if resumable is not None:
        resume.discard(resumable)
    size = weights_size_bytes(out_dir)
    floor_metrics = {}
    if "size_floor_bytes" in extra:
        floor_metrics["size_over_floor"] = over_floor(size, extra["size_floor_bytes"])
        if floor_metrics["size_over_floor"] > FLOOR_GOAL:
            log.warning("quantize: %d bytes, %.1f%% above the floor of %d bytes", size, 100 * floor_metrics["size_over_floor"], extra["size_floor_bytes"])
    return {
        "size_bytes": size,
        "bits_per_parameter": 8 * size / extra["num_parameters"],
        **extra,
        **floor_metrics,
        **({"self_check_on_cpu": unfit} if unfit else {}),
        "quantize_time_s": quantize_s,
        "self_check_time_s": time.time() - check_start,
        "wall_time_s": time.time() - start,
        "peak_memory_bytes": peak["bytes"],
    }


def self_check_unfit(out_dir: str | Path, scheme: str, device: str) -> str | None:
    """Why the self-check cannot reload the output at ``out_dir`` whole on ``device`` (None: it can).

    transformers decompresses an llm-compressor checkpoint to 16 bits when it loads it
    (``loaded_bytes``: 8B took 15.5 GiB of GPU for a 5.7 GB W4A16 output); a 70B one does
    not fit an 80 GB GPU, and a reload that ran out of memory there would fail every rerun
    too (a resume skips only the calibration). bitsandbytes outputs reload quantized, as
    they were just built on the device."""
    if scheme in BNB_SCHEMES:
        return None
    return unfit_reason(loaded_bytes(out_dir), free_bytes(device), device)


def _run_llmcompressor(model_dir: str | Path, out_dir: str | Path, config: QuantizeConfig, calibration: DataSpec, texts: list[str],
                       device: str, resumable: Path) -> dict[str, Any]:
    record = resume.reuse(resumable, out_dir)
    if record is not None:
        log.info("quantize: resuming from %s: calibrated by an earlier try, calibration skipped", resumable)
        record["resumed"] = 1
    else:
        phase = time.time()
        # on the CPU: llm-compressor's pipelines onload each layer to the accelerator themselves (calibrated.calibrate)
        model, tokenizer = load_model(model_dir, dtype="auto", device="cpu")
        load_s = time.time() - phase
        num_parameters = count_parameters(model)
        config = _fit_group_size(model, config)  # before calibration: a misfit would fail only inside oneshot
        calibrated = config.scheme not in DATA_FREE_SCHEMES  # auto_ignore still needs data
        samples = calibration_samples(calibration, tokenizer, texts) if calibrated or config.auto_ignore else []
        ignore, extra = _mixed_precision(model, config, samples, num_parameters, device)
        quantized = [name for name, _ in linear_weights(model) if name not in ignore]
        floor = size_floor_bytes(model, quantized, config.scheme, config.group_size, zero_points=not _symmetric(config))
        phase = time.time()
        # a pruned model stays pruned (2:4 stays 2:4): GPTQ alone would fill the zeros in
        with keep_zeros(model) if _may_be_pruned(model) else contextlib.nullcontext(), _cpu_without_pinning(device):
            oneshot_quantize(model, config, ignore, samples if calibrated else [])
        calibrate_s = time.time() - phase
        grouped = {"group_size": config.group_size} if config.scheme in SCHEME_FIELDS["group_size"] else {}
        record = {"num_parameters": num_parameters, "calibration_samples": len(samples) if calibrated else 0,
                  "calibration_seq_len": calibration.seq_len, **grouped, "size_floor_bytes": floor, **extra,
                  "load_time_s": load_s, "calibrate_time_s": calibrate_s, "resumed": 0}
        phase = time.time()
        resume.persist(model, tokenizer, resumable, record, out_dir)
        record["persist_time_s"] = time.time() - phase
        del model
        release_calibrated(device)  # the reload check must not come on top of it
    _write_report(out_dir, record.pop("report"))
    return record


def _fit_group_size(model: Any, config: QuantizeConfig) -> QuantizeConfig:
    """``config`` with a group size that divides every Linear it quantizes ('auto'
    resolved, said in the log); a size that does not fit is a UserError."""
    if config.scheme not in SCHEME_FIELDS["group_size"]:
        return config
    ignored = quantize_mixed.resolve_ignore(model, config.ignore, strict=False)
    size = resolve_group_size(config.group_size, quantized_widths(model, ignored))
    if config.group_size == "auto":
        log.info("quantize: group_size auto -> %d (the largest of 128, 64, 32 that divides every quantized layer's input width)", size)
    return config.model_copy(update={"group_size": size})


def _run_bnb(model_dir: str | Path, out_dir: str | Path, config: QuantizeConfig, calibration: DataSpec, texts: list[str], device: str) -> dict[str, Any]:
    samples: list[list[int]] = []
    if config.auto_ignore:  # measuring sensitivity needs the 16-bit weights
        model, tokenizer = load_model(model_dir, dtype="auto", device=device)
        samples = calibration_samples(calibration, tokenizer, texts)
    else:  # naming the layers does not: a weightless skeleton keeps memory for the real load
        model = quantize_bnb.skeleton(model_dir)
    ignore, extra = _mixed_precision(model, config, samples, count_parameters(model), device)
    del model
    # bitsandbytes quantizes while it loads, one shard at a time
    quantized, tokenizer = quantize_bnb.load_quantized(model_dir, config.scheme, ignore, device,
                                                       int8_threshold=config.int8_threshold, double_quant=config.double_quant)
    num_parameters = count_parameters(quantized)
    save_model(quantized, tokenizer, out_dir)
    _write_report(out_dir, extra.pop("report"))
    return {"num_parameters": num_parameters, "calibration_samples": len(samples), **extra}


def _mixed_precision(model: Any, config: QuantizeConfig, samples: list[list[int]], num_parameters: int, device: str) -> tuple[list[str], dict[str, Any]]:
    """The exact names of the Linear layers kept 16-bit, and what to report about them."""
    explicit = config.ignore != DEFAULT_IGNORE
    ignore = quantize_mixed.resolve_ignore(model, config.ignore, strict=explicit)
    report: dict[str, Any] = {"scheme": config.scheme, "ignore": config.ignore, "kept": [{"name": n, "reason": "named in ignore"} for n in ignore]}
    if config.auto_ignore:
        plan = quantize_mixed.auto_ignore(
            model, ignore, samples[: config.auto_ignore.samples], config.auto_ignore.budget, num_parameters, device,
            scheme=config.scheme, group_size=config.group_size, symmetric=_symmetric(config), double_quant=config.double_quant,
        )
        ignore = ignore + [k["name"] for k in plan["kept"]]
        report["kept"] += plan["kept"]
        report["auto_ignore"] = {k: v for k, v in plan.items() if k != "kept"}
    for entry in report["kept"]:
        log.info("quantize: keeping %s in 16-bit: %s", entry["name"], entry["reason"])
    extra: dict[str, Any] = {"layers_kept_16bit": len(ignore), "report": report}
    if config.auto_ignore:
        extra["auto_ignore_estimated_bits_per_parameter"] = report["auto_ignore"]["estimated_bits_per_parameter"]
    return ignore, extra


def _may_be_pruned(model: Any) -> bool:
    """A cheap look before ``keep_zeros`` scans every weight (seconds on a 200M model,
    measured as most of llmpress's overhead over ``oneshot``): pruning, unstructured or
    N:M, leaves zeros all through a matrix, so its first 64k weights show them."""
    return any(float((linear.weight.detach().flatten()[:65536] == 0).float().mean()) > SPARSE_THRESHOLD for _, linear in linear_weights(model))


def _write_report(out_dir: str | Path, report: dict[str, Any]) -> None:
    """Which layers stayed 16-bit and why, beside the weights (it travels with the model)."""
    Path(out_dir, MIXED_PRECISION_REPORT).write_text(json.dumps(report, indent=2))


def _symmetric(config: QuantizeConfig) -> bool:
    # fp8 and w8a8 are llm-compressor's symmetric presets (no zero point on disk: counting one
    # put the floor 0.013 % above their outputs at 8B and 14B). For 4 bits, AWQ's published
    # recipe (and AutoAWQ's default) uses zero points, and so does the RTN baseline of the
    # AWQ paper's tables; GPTQ's does not
    if config.scheme not in quantize_mixed.INT4_SCHEMES:
        return True
    return config.symmetric if config.symmetric is not None else config.scheme == "gptq-w4a16"


@contextlib.contextmanager
def _cpu_without_pinning(device: str) -> Iterator[None]:
    """llm-compressor 0.14's AWQ pins cached activations for faster host-to-GPU copies,
    which fails with no accelerator ("Cannot access accelerator device when none is
    available"); on the CPU there is nothing to copy, so pinning is skipped."""
    if device != "cpu":
        yield
        return
    from compressed_tensors.utils import patch_attr
    from llmcompressor.pipelines.cache import IntermediatesCache

    with patch_attr(IntermediatesCache, "pin_memory", lambda *args, **kwargs: None):
        yield


def llmcompressor_recipe(config: QuantizeConfig, ignore: list[str]) -> list[Any]:
    """The llm-compressor modifiers that implement ``config.scheme``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    actorder = {"actorder": config.actorder} if config.actorder else {}
    if config.scheme == "fp8":
        return [QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=ignore)]
    if config.scheme == "w8a8":
        return [
            SmoothQuantModifier(smoothing_strength=config.smoothing_strength),
            GPTQModifier(targets=["Linear"], scheme="W8A8", ignore=ignore, dampening_frac=config.dampening_frac, **actorder),
        ]
    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=_symmetric(config),
        strategy="group" if config.group_size > 0 else "channel",
        group_size=config.group_size if config.group_size > 0 else None,
        **actorder,
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if config.scheme == "rtn-w4a16":  # round-to-nearest: observe each weight's min/max, nothing else
        return [QuantizationModifier(config_groups=groups, ignore=ignore)]
    if config.scheme == "awq-w4a16":
        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=ignore)]
    return [GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=config.dampening_frac, **actorder)]


def oneshot_quantize(model: Any, config: QuantizeConfig, ignore: list[str], samples: list[list[int]]) -> None:
    """Run llm-compressor's ``oneshot`` on tokenized calibration windows (none for fp8)."""
    calibrate(model, llmcompressor_recipe(config, ignore), samples, config.sequential_offload_device)
