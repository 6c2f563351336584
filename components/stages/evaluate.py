"""Evaluation: quality and cost of one model, and each figure as a ratio to the baseline.

Perplexity uses a strided sliding window: windows of ``seq_len`` tokens start every
``stride`` tokens; each token is scored once, by the first window whose new part
holds it, so with ``stride < seq_len`` every scored token sees at least
``seq_len - stride`` tokens of context.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

from llmpress.components.data import DataSpec, token_stream
from llmpress.components.errors import UserError
from llmpress.components.measure import peak_memory
from llmpress.components.modelio import count_parameters, load_model, pick_device, weights_size_bytes
from pydantic import BaseModel, ConfigDict, Field, model_validator

RATIO_KEYS = ("perplexity", "size_bytes", "num_parameters", "bits_per_parameter")


class EvaluateConfig(BaseModel):
    """Settings of an evaluation; ``data`` defaults to the recipe's data.evaluation."""

    model_config = ConfigDict(extra="forbid")

    data: DataSpec | None = Field(None, description="evaluation text; default: the recipe's data.evaluation")
    stride: int | None = Field(None, gt=0, description="tokens between window starts; default: seq_len (no overlap)")
    batch_size: int = Field(8, gt=0, le=1024, description="windows per forward pass")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to evaluate")

    @model_validator(mode="after")
    def _stride_fits(self) -> EvaluateConfig:
        if self.stride is not None and self.data is not None and self.stride > self.data.seq_len:
            raise ValueError(f"stride {self.stride} is longer than data.seq_len {self.data.seq_len}; allowed: 1..seq_len")
        return self


def run(model_dir: str | Path, config: EvaluateConfig, data: DataSpec, texts: list[str], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the model at ``model_dir``; with ``baseline`` metrics, add ``*_ratio``."""
    device = pick_device(config.device)
    start = time.time()
    model, tokenizer = load_model(model_dir, device=device)
    num_parameters = count_parameters(model)
    stream = token_stream(texts, tokenizer)
    with peak_memory(device) as peak:
        ppl, scored = perplexity(model, stream, data.seq_len, config.stride or data.seq_len, data.num_samples, config.batch_size, device)
    size = weights_size_bytes(model_dir)
    metrics: dict[str, Any] = {
        "perplexity": ppl,
        "eval_tokens": scored,
        "size_bytes": size,
        "num_parameters": num_parameters,
        "bits_per_parameter": 8 * size / num_parameters,
        "eval_wall_time_s": time.time() - start,
        "eval_peak_memory_bytes": peak["bytes"],
    }
    if baseline:
        metrics.update(ratios(metrics, baseline))
    return metrics


def ratios(metrics: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """``KEY_ratio = metrics[KEY] / baseline[KEY]`` for the figures users compare."""
    return {f"{k}_ratio": metrics[k] / baseline[k] for k in RATIO_KEYS if metrics.get(k) and baseline.get(k)}


def perplexity(model: Any, stream: list[int], seq_len: int, stride: int, max_windows: int, batch_size: int, device: str) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over the stream with a strided sliding window.

    Returns (perplexity, number of scored tokens)."""
    import torch

    if len(stream) < 2:
        raise UserError.field("data.evaluation.source", "(evaluation text)", "holds fewer than 2 tokens")
    ids = torch.tensor(stream)
    windows = []  # (begin, end, first scored position inside the window)
    scored_until = 0
    for begin in range(0, len(stream) - 1, stride):
        end = min(begin + seq_len, len(stream))
        first = max(scored_until, begin + 1) - begin
        if first < end - begin:
            windows.append((begin, end, first))
        scored_until = end
        if end == len(stream) or len(windows) == max_windows:
            break
    nll, count = 0.0, 0
    with torch.no_grad():
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
            logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits.float()
            # position t predicts token t+1
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = labels[:, 1:].to(device)
            keep = target != -100
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll -= picked[keep].double().sum().item()
            count += int(keep.sum())
    return math.exp(nll / count), count
