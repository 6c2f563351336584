"""Structured pruning: remove whole attention heads and FFN channels, and rewrite the
weights and the config into a smaller dense model that plain ``transformers`` loads.

No maintained library does this for Hugging Face Llama-family models (llm-compressor
zeroes weights in place; torch.nn.utils.prune only masks), so it is written here.

**Importance score.** A unit is worth what it adds to the residual stream. Over the
calibration tokens t, its score is the summed squared L2 norm of its contribution:

- FFN channel j: ``s_j = ||W_down[:, j]||² · Σ_t h_tj²``, where ``h = act(gate(x)) * up(x)``
  is the input of ``down_proj``;
- attention head h: ``s_h = Σ_t ||W_o[:, h] a_th||² = ⟨W_o,hᵀ W_o,h , Σ_t a_th a_thᵀ⟩``,
  where ``a_th`` is head h's output (its slice of ``o_proj``'s input);
- key/value group g (grouped-query attention): the sum of its query heads' scores. A
  group is removed whole, with its key/value head and all its query heads, so every
  remaining query head keeps the key/value head it was trained with.

Units are scored one at a time (cross terms between units are ignored), on the
unpruned model, in one calibration pass. Removing a unit is then *exact* relative to
zeroing its ``o_proj`` / ``down_proj`` columns in the original: the smaller model
computes what that masked model computes.

**Uniform per layer.** A transformers config holds one head count, one key/value head
count and one intermediate size for all layers, so every layer removes the same
*number* of groups and channels; *which* ones is each layer's own choice by its scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmpress.components.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Shape:
    """The per-layer sizes structured pruning works on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


def model_shape(model: Any) -> Shape:
    """Sizes read from the config; a model type whose layout is not Llama's is refused."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError.field("method", "structured", f"supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; this model is {cfg.model_type!r}")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Shape(cfg.num_hidden_layers, cfg.hidden_size, heads, kv, head_dim, cfg.intermediate_size)


def unit_costs(model: Any, shape: Shape) -> tuple[int, int]:
    """Parameters removed per layer by one key/value group and by one FFN channel."""
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    r, d = shape.group_size, shape.head_dim
    group = sum(rows * (lin.in_features + (lin.bias is not None)) for lin, rows in ((attn.q_proj, r * d), (attn.k_proj, d), (attn.v_proj, d)))
    group += attn.o_proj.out_features * r * d
    channel = sum(lin.in_features + (lin.bias is not None) for lin in (mlp.gate_proj, mlp.up_proj)) + mlp.down_proj.out_features
    return group, channel


def plan(model: Any, num_parameters: int, attention_sparsity: float, ffn_sparsity: float | None,
         target_parameters: int | None, channel_multiple: int) -> tuple[int, int]:
    """(key/value groups kept, FFN channels kept) per layer.

    Groups: ``round(attention_sparsity * kv_heads)`` removed, at least one kept. Channels:
    ``ffn_sparsity`` of them, or, with ``target_parameters``, as many as the target
    allows; the kept width is a multiple of ``channel_multiple``."""
    shape = model_shape(model)
    groups_kept = max(1, shape.kv_heads - round(attention_sparsity * shape.kv_heads))
    if channel_multiple > shape.intermediate:
        raise UserError.field("channel_multiple", channel_multiple, f"at most the FFN width of this model ({shape.intermediate})")
    if target_parameters is None:
        wanted = shape.intermediate * (1 - (ffn_sparsity or 0.0))
        channels_kept = min(shape.intermediate, max(channel_multiple, channel_multiple * round(wanted / channel_multiple)))
        return groups_kept, channels_kept
    if target_parameters >= num_parameters:
        raise UserError.field("target_parameters", target_parameters, f"must be below the model's {num_parameters} parameters")
    group_cost, channel_cost = unit_costs(model, shape)
    after_attention = num_parameters - shape.layers * (shape.kv_heads - groups_kept) * group_cost
    # the largest kept width (a multiple of channel_multiple) whose model fits the target
    spare = target_parameters - (after_attention - shape.layers * shape.intermediate * channel_cost)
    channels_kept = min(shape.intermediate, spare // (shape.layers * channel_cost) // channel_multiple * channel_multiple)
    if channels_kept < channel_multiple:
        smallest = after_attention - shape.layers * (shape.intermediate - channel_multiple) * channel_cost
        raise UserError.field("target_parameters", target_parameters, f"unreachable: at least {smallest} with attention_sparsity={attention_sparsity}, "
                                                                  f"channel_multiple={channel_multiple}")
    return groups_kept, channels_kept


def importance(model: Any, samples: list[list[int]], device: str, batch_size: int = 8) -> list[tuple[Any, Any]]:
    """Per layer: (score of each key/value group, score of each FFN channel), measured
    on the calibration samples as the module docstring says."""
    import torch

    shape = model_shape(model)
    layers = model.model.layers
    head_cov = [torch.zeros(shape.heads, shape.head_dim, shape.head_dim, device=device) for _ in layers]
    channel_sq = [torch.zeros(shape.intermediate, device=device) for _ in layers]

    def heads_hook(i: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            a = args[0].detach().float().reshape(-1, shape.heads, shape.head_dim)
            head_cov[i] += torch.einsum("nhd,nhe->hde", a, a)
        return hook

    def channels_hook(i: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            channel_sq[i] += args[0].detach().float().reshape(-1, shape.intermediate).pow(2).sum(0)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(heads_hook(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(channels_hook(i)))
    try:
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                model(input_ids=torch.tensor(samples[start : start + batch_size], device=device))
    finally:
        for handle in handles:
            handle.remove()

    scores = []
    for i, layer in enumerate(layers):
        w_o = layer.self_attn.o_proj.weight.detach().float().reshape(shape.hidden, shape.heads, shape.head_dim)
        gram = torch.einsum("ohd,ohe->hde", w_o, w_o)
        head_scores = (gram * head_cov[i]).sum((-1, -2))
        group_scores = head_scores.reshape(shape.kv_heads, shape.group_size).sum(1)
        column_norms = layer.mlp.down_proj.weight.detach().float().pow(2).sum(0)
        scores.append((group_scores.cpu(), (column_norms * channel_sq[i]).cpu()))
    return scores


def choose(scores: list[tuple[Any, Any]], groups_kept: int, channels_kept: int) -> list[tuple[list[int], list[int]]]:
    """Per layer, the kept group and channel indices (the highest scores, in original order)."""
    kept = []
    for group_scores, channel_scores in scores:
        groups = sorted(group_scores.topk(groups_kept).indices.tolist())
        channels = sorted(channel_scores.topk(channels_kept).indices.tolist())
        kept.append((groups, channels))
    return kept


def _sliced(linear: Any, rows: Any = None, cols: Any = None) -> Any:
    """A new Linear holding the given output rows / input columns of ``linear``."""
    import torch

    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = linear.bias.detach()[rows] if linear.bias is not None and rows is not None else linear.bias
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def shrink(model: Any, kept: list[tuple[list[int], list[int]]]) -> None:
    """Rewrite every layer to its kept groups and channels, and the config to match."""
    import torch

    shape = model_shape(model)
    r, d = shape.group_size, shape.head_dim
    for layer, (groups, channels) in zip(model.model.layers, kept, strict=True):
        device = layer.mlp.down_proj.weight.device
        heads = [g * r + j for g in groups for j in range(r)]  # repeat_kv: query head g*r+j reads kv head g
        q_rows = torch.tensor([h * d + k for h in heads for k in range(d)], device=device)
        kv_rows = torch.tensor([g * d + k for g in groups for k in range(d)], device=device)
        ch = torch.tensor(channels, device=device)
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _sliced(attn.q_proj, rows=q_rows)
        attn.k_proj = _sliced(attn.k_proj, rows=kv_rows)
        attn.v_proj = _sliced(attn.v_proj, rows=kv_rows)
        attn.o_proj = _sliced(attn.o_proj, cols=q_rows)
        mlp.gate_proj = _sliced(mlp.gate_proj, rows=ch)
        mlp.up_proj = _sliced(mlp.up_proj, rows=ch)
        mlp.down_proj = _sliced(mlp.down_proj, cols=ch)
    groups_kept, channels_kept = len(kept[0][0]), len(kept[0][1])
    cfg = model.config
    cfg.num_attention_heads = groups_kept * r
    cfg.num_key_value_heads = groups_kept
    cfg.head_dim = d  # explicit: the default hidden_size // num_attention_heads would now be wrong
    cfg.intermediate_size = channels_kept


def report(shape: Shape, kept: list[tuple[list[int], list[int]]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-layer summary for the metrics, per-layer kept indices for pruning.json)."""
    r = shape.group_size
    summary, detail = [], []
    for i, (groups, channels) in enumerate(kept):
        removed_groups = [g for g in range(shape.kv_heads) if g not in groups]
        summary.append({
            "layer": i,
            "removed_kv_groups": removed_groups,
            "removed_heads": [g * r + j for g in removed_groups for j in range(r)],
            "removed_channels": shape.intermediate - len(channels),
        })
        detail.append({"layer": i, "kept_kv_groups": groups, "kept_channels": channels})
    return summary, detail


# Whole units remove a fraction in steps of 1/units: an amount that lands further than
# this from what was asked is refused, not silently changed (SmolLM2-135M has 3 key/value
# groups: 0.2 of them would remove one, a third of its query heads).
ROUNDING_TOLERANCE = 0.05


def check_rounding(field: str, asked: float, kept: int, units: int, unit_name: str) -> float:
    """The fraction of ``units`` actually removed when ``kept`` remain; a UserError naming
    the fractions this model allows when it is further than ``ROUNDING_TOLERANCE`` from ``asked``."""
    removed = (units - kept) / units
    if abs(removed - asked) > ROUNDING_TOLERANCE:
        steps = ", ".join(f"{k / units:.3g}" for k in range(units) if units <= 16 or k % max(1, units // 8) == 0)
        raise UserError.field(field, asked, f"this model has {units} {unit_name} per layer, removed whole: {units - kept} of {units} "
                              f"({removed:.3g}) is the nearest, further than {ROUNDING_TOLERANCE} from what was asked; "
                              f"fractions this model allows: {steps}")
    return removed
