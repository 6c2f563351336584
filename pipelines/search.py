"""A recipe's ``search:`` block: a budget, a space of candidate chains, and how to search it.

The space has one list of options per stage kind, in the order the kinds run: ``prune``,
``distill``, ``quantize`` and ``mixed_precision`` (quantize options whose 16-bit layers
are chosen by measured sensitivity, within the size budget). An option is a stage's
fields (``name`` and ``resources`` optional; ``grid:`` expands fields over values) or
``none`` (no stage of that kind). Every chain of one option per kind is a candidate.
``expand`` turns the block into candidates: lists of stage dicts, validated by the
recipe like any stage (``Recipe._search_problems``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AXES = ("prune", "distill", "quantize", "mixed_precision")
AXIS_KIND = {"prune": "prune", "distill": "distill", "quantize": "quantize", "mixed_precision": "quantize"}
SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
BASELINE_BITS = 16  # mixed_precision reads size_ratio against a 16-bit (bf16/fp16) baseline


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    """What the winner must meet; every limit set is one constraint (at least one)."""

    size_bytes: int | None = Field(None, gt=0, description="most bytes on disk: a number or '4GB', '300MiB'")
    size_ratio: float | None = Field(None, gt=0, le=1, description="most size on disk relative to the baseline's")
    perplexity_ratio: float | None = Field(None, gt=0, description="most perplexity relative to the baseline's (1.02: at most 2% worse)")
    accuracy_recovery: float | None = Field(None, gt=0, le=2, description="least task accuracy relative to the baseline's, every task (needs evaluation.tasks)")
    latency_ratio: float | None = Field(None, gt=0, description="most decode time per token relative to the baseline's, smallest latency batch")
    throughput_ratio: float | None = Field(None, gt=0, description="least tokens per second relative to the baseline's, largest latency batch")

    @field_validator("size_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = SIZE.match(value)
            if not match:
                raise ValueError("a number of bytes or a size such as '4GB', '300MB', '2GiB'")
            return int(float(match[1]) * UNITS[match[2]])
        return value

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError(f"a budget needs at least one of {', '.join(type(self).model_fields)}")
        return self


class Screen(_Strict):
    """The cheap first evaluation of every candidate (perplexity on a few windows, size)."""

    windows: int = Field(8, ge=1, le=100_000, description="evaluation windows of the screening (the full evaluation uses data.evaluation.num_samples)")
    margin: float = Field(0.05, ge=0, le=1, description="perplexity slack: a candidate goes on unless beaten by more than this fraction")
    keep: Literal["front", "winner"] = Field(
        "front", description="who gets the full evaluation: every candidate that could be on the (size, perplexity) front, "
        "or only those that could still be the winner (cheaper; the report's front is drawn from those)")


Option = dict[str, Any] | Literal["none"]


class Space(_Strict):
    prune: list[Option] = Field(default_factory=list, max_length=64)
    distill: list[Option] = Field(default_factory=list, max_length=64)
    quantize: list[Option] = Field(default_factory=list, max_length=64)
    mixed_precision: list[dict[str, Any]] = Field(
        default_factory=list, max_length=64,
        description="quantize options plus fill: [fractions]; auto_ignore keeps sensitive layers 16-bit within fill × the size budget",
    )


class Search(_Strict):
    budget: Budget
    objective: Literal["perplexity", "size"] = Field("perplexity", description="what the winner minimizes among candidates meeting the budget")
    space: Space
    parallelism: int = Field(4, ge=1, le=256, description="most candidate steps running at once on the cluster")
    screen: Screen | None = Field(default_factory=Screen, description="cheap evaluation first; null: the full evaluation of every candidate")
    max_candidates: int = Field(64, ge=1, le=1024)


@dataclass(frozen=True)
class Candidate:
    name: str
    label: str  # the chain for reading: 'sparsegpt-50 → gptq-w4a16-g64'
    stages: tuple[dict[str, Any], ...]


def expand_options(search: Search) -> tuple[dict[str, list[tuple[str, dict[str, Any] | None]]], list[str]]:
    """Each axis's options after ``grid`` expansion, as (field path, stage dict or None),
    and one line per problem found on the way."""
    problems: list[str] = []
    axes: dict[str, list[tuple[str, dict[str, Any] | None]]] = {}
    for axis in AXES:
        options: list[tuple[str, dict[str, Any] | None]] = []
        for i, option in enumerate(getattr(search.space, axis)):
            where = f"search.space.{axis}[{i}]"
            if option == "none":
                options.append((where, None))
                continue
            option = dict(option)
            if "kind" in option:
                problems.append(f"{where}.kind: {option['kind']!r} — set by the axis ({AXIS_KIND[axis]}); drop it")
                continue
            if axis == "mixed_precision":
                option = _mixed(option, search.budget, where, problems)
                if option is None:
                    continue
            grid = option.pop("grid", {})
            if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
                if grid != {}:
                    problems.append(f"{where}.grid: {grid!r} — a mapping of field to a non-empty list of values")
                grid = {}
            keys = list(grid)
            for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
                stage = {**option, **dict(zip(keys, values, strict=True)), "kind": AXIS_KIND[axis]}
                options.append((where, stage))
        axes[axis] = options
    return axes, problems


def _mixed(option: dict[str, Any], budget: Budget, where: str, problems: list[str]) -> dict[str, Any] | None:
    """A mixed_precision option → quantize options whose auto_ignore budget (bits per
    parameter) is ``fill`` × the size budget; ``fill`` becomes a grid over the budget."""
    fill = option.pop("fill", [1.0])
    if budget.size_ratio is None:
        problems.append(f"{where}: mixed_precision — needs search.budget.size_ratio (its bits-per-parameter budget is derived from it)")
        return None
    if not isinstance(fill, list) or not fill or not all(isinstance(f, int | float) and 0 < f <= 1 for f in fill):
        problems.append(f"{where}.fill: {fill!r} — a non-empty list of fractions in (0, 1] of the size budget")
        return None
    if "auto_ignore" in option:
        problems.append(f"{where}.auto_ignore: given — mixed_precision sets it from the size budget; use quantize for a fixed one")
        return None
    samples = option.pop("samples", 8)
    grid = dict(option.pop("grid", {}) or {})
    grid["auto_ignore"] = [{"budget": round(f * budget.size_ratio * BASELINE_BITS, 4), "samples": samples} for f in fill]
    return {**option, "grid": grid}


def candidates(search: Search, axes: dict[str, list[tuple[str, dict[str, Any] | None]]]) -> list[Candidate]:
    """Every chain of one option per axis (prune → distill → quantize), in a stable order;
    stage names made unique and readable. Quantize and mixed_precision share one axis."""
    lists = [axes["prune"] or [("", None)], axes["distill"] or [("", None)], (axes["quantize"] + axes["mixed_precision"]) or [("", None)]]
    named: dict[str, str] = {}  # the same option gets the same name in every chain it is in
    out = []
    for chain in itertools.product(*lists):
        stages = []
        for _, option in chain:
            if option is None:
                continue
            key = repr(sorted(option.items(), key=lambda kv: kv[0]))
            if key not in named:
                named[key] = _unique(option.get("name") or stage_name(option), set(named.values()))
            stages.append({**option, "name": named[key]})
        if stages:
            out.append(Candidate(name=f"c{len(out) + 1}", label=" → ".join(s["name"] for s in stages), stages=tuple(stages)))
    return out


def stage_name(option: dict[str, Any]) -> str:
    """A readable stage name from its settings: 'gptq-w4a16-g64', 'gptq-w4a16-g32-asym', 'sparsegpt-50', 'wanda-2of4'."""
    parts = [str(option.get("scheme") or option.get("method") or option["kind"])]
    if "group_size" in option:
        parts.append(f"g{option['group_size']}")
    if isinstance(option.get("symmetric"), bool):  # a grid over zero points would otherwise name two stages alike
        parts.append("sym" if option["symmetric"] else "asym")
    if isinstance(option.get("sparsity"), int | float):
        parts.append(f"{round(100 * option['sparsity'])}")
    if option.get("mask_structure") not in (None, "0:0"):
        parts.append(str(option["mask_structure"]).replace(":", "of"))
    if isinstance(option.get("auto_ignore"), dict):
        parts.append(f"mp{option['auto_ignore'].get('budget')}")
    if "ignore" in option:
        parts.append(f"i{len(option['ignore'] or [])}")
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    return name[:36].strip("-") or option["kind"]


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    for i in itertools.count(2):
        if f"{name}-{i}" not in taken:
            return f"{name}-{i}"
    raise AssertionError("unreachable")
