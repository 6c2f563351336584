"""Evaluation: quality and cost of one model, and each figure as a ratio to the baseline.

Quality: perplexity (below), task accuracy through lm-evaluation-harness
(``evaluate_tasks``) and a fixed greedy generation sample for eyeballing. Cost: size on
disk, parameter count, measured sparsity, peak memory, and latency/throughput
(``evaluate_speed``), all on the device the stage runs on, which every figure names
(``eval_device``).

Perplexity uses a strided sliding window: windows of ``seq_len`` tokens start every
``stride`` tokens; each token is scored once, by the first window whose new part
holds it, so with ``stride < seq_len`` every scored token after the first window sees
at least ``seq_len - stride`` tokens of context. ``stride == seq_len`` (the default)
gives non-overlapping windows: cheaper, but early tokens of each window see little
context (and a window's first token, with none, is not scored), so perplexity reads
higher. This is the computation of Hugging Face's perplexity guide, batched.
"""

from __future__ import annotations

import inspect
import math
import platform
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from llmpress.components.data import DataSpec, token_stream
from llmpress.components.errors import UserError
from llmpress.components.models.io import count_parameters, load_model, loaded_bytes, pick_device, weights_size_bytes
from llmpress.components.models.measure import free_bytes, peak_memory, unfit_reason
from llmpress.components.stages.evaluate import speed as evaluate_speed
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Figures that describe the measurement rather than the model: no ratio for them.
NO_RATIO = ("eval_tokens", "eval_windows", "eval_seq_len", "eval_stride", "eval_wall_time_s", "sparsity_counted_weights")


class LatencyConfig(BaseModel):
    """Shapes of the latency and throughput measurement (random prompt tokens, greedy)."""

    model_config = ConfigDict(extra="forbid")

    batch_sizes: list[Annotated[int, Field(ge=1, le=1024)]] = Field([1, 8], max_length=16, description="sequences decoded together; [] turns it off")
    prompt_tokens: int = Field(128, gt=0, le=131_072, description="prompt length (time to first token is its prefill)")
    new_tokens: int = Field(32, gt=1, le=8192, description="tokens generated per sequence")
    repeats: int = Field(3, gt=0, le=100, description="timed repetitions after one warm-up; the median is reported")


class EvaluateConfig(BaseModel):
    """Settings of an evaluation; ``data`` defaults to the recipe's data.evaluation."""

    model_config = ConfigDict(extra="forbid")

    data: DataSpec | None = Field(None, description="evaluation text; default: the recipe's data.evaluation")
    stride: int | None = Field(None, gt=0, description="tokens between window starts; default: seq_len (no overlap)")
    batch_size: int = Field(8, gt=0, le=1024, description="windows (or harness requests) per forward pass")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to evaluate")
    tasks: list[str] = Field(
        default_factory=list, max_length=64,
        description="lm-evaluation-harness tasks: builtin:pydoc-cloze, a local task YAML (data files relative to it), "
        "or a harness task name such as hellaswag, arc_easy, mmlu_abstract_algebra (needs the hub or its cache)",
    )
    task_limit: int | None = Field(None, gt=0, description="examples per task; default: all")
    num_fewshot: int | None = Field(None, ge=0, le=64, description="few-shot examples; default: each task's own")
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    sample_prompt: str = Field("The following example shows how to", max_length=2000, description="prompt of the fixed greedy generation sample")
    sample_tokens: int = Field(32, ge=0, le=1024, description="tokens of the generation sample; 0 turns it off")
    count_sparsity: bool = Field(True, description="count the exact zeros of the Linear weights (the sparsity figure); "
                                 "a search's screening leaves it out")

    @model_validator(mode="after")
    def _stride_fits(self) -> EvaluateConfig:
        if self.stride is not None and self.data is not None and self.stride > self.data.seq_len:
            raise ValueError(f"stride {self.stride} is longer than data.seq_len {self.data.seq_len}; allowed: 1..seq_len")
        return self


def run(
    model_dir: str | Path, config: EvaluateConfig, data: DataSpec, texts: list[str],
    baseline: dict[str, Any] | None = None, field: str = "evaluation",
) -> dict[str, Any]:
    """Evaluate the model at ``model_dir``; with ``baseline`` metrics, add ``*_ratio``.

    ``field`` names the recipe section the config came from, for error messages."""
    stride = config.stride or data.seq_len
    if stride > data.seq_len:
        raise UserError.field(f"{field}.stride", stride, f"at most data.evaluation.seq_len ({data.seq_len})")
    device = pick_device(config.device)
    size = weights_size_bytes(model_dir)
    # before the load (at 70B minutes of it); a compressed checkpoint is decompressed when
    # it loads, so it needs the dense model's bytes, not its files'
    available = free_bytes(device)
    unfit = unfit_reason(loaded_bytes(model_dir), available, device) if available is not None else None
    if unfit:
        raise UserError.field(f"{field}.device", config.device, f"{unfit}; give the step a GPU with more memory (resources), or device: cpu")
    start = time.time()
    dtype = compute_dtype(device)
    model, tokenizer = load_model(model_dir, dtype=dtype, device=device)
    num_parameters = count_parameters(model)
    metrics: dict[str, Any] = {
        "eval_device": device_label(device),
        "eval_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "size_bytes": size,
        "num_parameters": num_parameters,
        "bits_per_parameter": 8 * size / num_parameters,
        **(sparsity(model) if config.count_sparsity else {}),
        **source_provenance(model_dir),
    }
    stream = token_stream(texts, tokenizer)
    with peak_memory(device) as peak:
        ppl, scored, windows = perplexity(model, stream, data.seq_len, stride, data.num_samples, config.batch_size, device)
        metrics.update(perplexity=ppl, eval_tokens=scored, eval_windows=windows, eval_seq_len=data.seq_len, eval_stride=stride)
        if config.tasks:
            from llmpress.components.stages.evaluate.tasks import task_metrics

            metrics.update(task_metrics(model, tokenizer, config.tasks, config.task_limit, config.num_fewshot, config.batch_size, device, field))
        if config.sample_tokens:
            metrics["generation_sample"] = generation_sample(model, tokenizer, config.sample_prompt, config.sample_tokens, device)
        if config.latency.batch_sizes:
            _check_context(model, config.latency, field)
            lat = config.latency
            metrics.update(evaluate_speed.latency(model, lat.batch_sizes, lat.prompt_tokens, lat.new_tokens, lat.repeats, device))
    metrics["eval_peak_memory_bytes"] = peak["bytes"]
    metrics["eval_peak_memory_kind"] = "cuda max_memory_allocated" if device.startswith("cuda") else "process peak RSS"
    metrics["eval_wall_time_s"] = time.time() - start
    if baseline:
        metrics.update(ratios(metrics, baseline))
    return metrics


def source_provenance(model_dir: str | Path) -> dict[str, str]:
    """Where a model converted from a GGUF file came from (its weights were dequantized
    from that format, so the 'baseline' is itself a quantized model): ``source_*`` labels."""
    from llmpress.components.models.gguf import read_source_record

    record = read_source_record(model_dir)
    if record is None:
        return {}
    return {"source_format": record["format"], "source_file": record["file"], "source_sha256": record["sha256"],
            "source_gguf_quantization": record["gguf_quantization"]}


def ratios(metrics: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """``KEY_ratio = metrics[KEY] / baseline[KEY]`` for every figure both have.

    ×100 it is the recovery % of a quality figure (accuracy) and the fraction kept of a
    cost figure (size, latency); for perplexity, lower is better."""
    out = {}
    for key, value in metrics.items():
        base = baseline.get(key)
        if key in NO_RATIO or key.endswith(("_ratio", "_stderr")) or ".samples" in key or "_stderr." in key:
            continue
        if _number(value) and _number(base) and base != 0:
            out[f"{key}_ratio"] = value / base
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def compute_dtype(device: str) -> str:
    """The dtype evaluation computes in: the checkpoint's own, except on a CPU without
    native bfloat16 (no AVX512-BF16 or AMX), where bf16 matmuls are emulated (5x slower
    than float32 for SmolLM2-135M on the 2-core CI machine) and float32 is used instead.
    Baseline and compressed models are evaluated alike, so ratios compare like with like."""
    if device != "cpu":
        return "auto"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "float32"
    return "auto" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def device_label(device: str) -> str:
    """The device every figure was measured on, e.g. 'cuda: NVIDIA H100 80GB HBM3'."""
    import torch

    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"


def sparsity(model: Any) -> dict[str, float | int]:
    """Fraction of exact zeros in the weights of the Linear layers (lm_head included).

    Packed low-bit weights (compressed-tensors, symmetric) count the zero codes they
    hold, which decode to exact zeros; other packed formats are left out of the count."""
    import torch

    zeros, total = 0, 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and isinstance(weight, torch.Tensor) and weight.is_floating_point():
            zeros += int((weight == 0).sum())
            total += weight.numel()
        elif hasattr(module, "weight_packed"):
            codes = _unpacked_codes(module)
            if codes is not None:
                zeros += int((codes == 0).sum())
                total += codes.numel()
    return {"sparsity": zeros / total if total else 0.0, "sparsity_counted_weights": total}


def _unpacked_codes(module: Any) -> Any | None:
    scheme = getattr(getattr(module, "quantization_scheme", None), "weights", None)
    if scheme is None or not scheme.symmetric:
        return None  # an asymmetric code of 0 is not a zero weight
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    except ImportError:
        return None
    shape = module.weight_shape.tolist() if hasattr(module, "weight_shape") else [module.out_features, module.in_features]
    return unpack_from_int32(module.weight_packed.data, scheme.num_bits, shape)


def generation_sample(model: Any, tokenizer: Any, prompt: str, new_tokens: int, device: str) -> str:
    """Greedy continuation of a fixed prompt: the same text for every stage of a run."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _check_context(model: Any, lat: LatencyConfig, field: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and lat.prompt_tokens + lat.new_tokens > limit:
        raise UserError.field(f"{field}.latency.prompt_tokens", lat.prompt_tokens, f"prompt_tokens + new_tokens must fit the model's context of {limit} tokens")


def perplexity(model: Any, stream: list[int], seq_len: int, stride: int, max_windows: int, batch_size: int, device: str) -> tuple[float, int, int]:
    """exp(mean negative log-likelihood) over the stream with a strided sliding window.

    Returns (perplexity, number of scored tokens, number of windows)."""
    import torch
    import torch.nn.functional as F

    if len(stream) < 2:
        raise UserError.field("data.evaluation.source", "(evaluation text)", "holds fewer than 2 tokens")
    windows = sliding_windows(len(stream), seq_len, stride, max_windows)
    ids = torch.tensor(stream)
    # Only the logits of scored positions are needed: with overlapping windows that is
    # the last `stride` of them, which spares most of the lm_head and the softmax.
    trims_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            width = max(e - b for b, e, _ in chunk)
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (b, e, first) in enumerate(chunk):
                inputs[row, : e - b] = ids[b:e]
                labels[row, first : e - b] = ids[b + first : e]
                mask[row, : e - b] = 1
            # position t predicts token t+1; `keep` logits are the last positions
            keep = width - min(first for _, _, first in chunk) + 1 if trims_logits else width
            extra = {"logits_to_keep": keep} if trims_logits else {}
            logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device), **extra).logits
            target = labels[:, width - keep + 1 :].to(device)
            nll += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum").double()
            count += int((target != -100).sum())
    return math.exp(nll.item() / count), count, len(windows)


def sliding_windows(length: int, seq_len: int, stride: int, max_windows: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position inside the window) for each window."""
    windows = []
    scored_until = 0
    for begin in range(0, length - 1, stride):
        end = min(begin + seq_len, length)
        first = max(scored_until, begin + 1) - begin
        if first < end - begin:
            windows.append((begin, end, first))
        scored_until = end
        if end == length or len(windows) == max_windows:
            break
    return windows
