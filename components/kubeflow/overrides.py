"""Run parameters applied to the part of the recipe a step receives.

A step gets its part of the recipe as JSON fixed at compile time and the run parameters
it uses as inputs of its own (``pipelines/parameters.py`` says which). A parameter's
default is the recipe's value, so only a value that differs from what the step's part
already means is written into it: a field the recipe left unset stays unset unless a
run changes it (the stage configs refuse, say, a group size set for a scheme without
groups). The pipeline's first step has validated the whole effective recipe already.
"""

from __future__ import annotations

import json
from typing import Any

from llmpress.components.data import DataSpec
from llmpress.components.models.io import ModelSpec
from llmpress.components.stages.distill import DistillConfig
from llmpress.components.stages.evaluate import EvaluateConfig
from llmpress.components.stages.prune import PruneConfig
from llmpress.components.stages.quantize import QuantizeConfig
from pydantic import BaseModel

STAGE_CONFIGS: dict[str, type[BaseModel]] = {"quantize": QuantizeConfig, "prune": PruneConfig, "distill": DistillConfig, "evaluate": EvaluateConfig}
# settings a run form gives as text although the recipe may hold a number: group_size is
# 32, 64, 128, 256, -1 or 'auto'
TEXT_NUMBERS = ("group_size",)


def recipe_value(field: str, value: Any) -> Any:
    """A run parameter's value as the recipe holds it ('64' is 64 for group_size)."""
    if field in TEXT_NUMBERS and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def set_path(data: dict[str, Any], path: list[Any] | tuple[Any, ...], value: Any) -> None:
    """Set ``data[path[0]][path[1]]…`` to ``value``, making the mappings on the way."""
    *parents, last = path
    node: Any = data
    for key in parents:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        else:
            node = node[key]
    node[last] = value


def _with_values(spec: dict[str, Any], config_type: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with each value that differs from the field's current meaning set."""
    current = config_type.model_validate({k: v for k, v in spec.items() if k in config_type.model_fields})
    out = dict(spec)
    for key, value in values.items():
        value = recipe_value(key, value)
        if value is not None and value != getattr(current, key):
            out[key] = value
    return out


def model(model_json: str, source: str, revision: str) -> str:
    """The model's spec with the ``model_source`` and ``model_revision`` parameters."""
    return json.dumps(_with_values(json.loads(model_json), ModelSpec, {"source": source, "revision": revision or None}))


def data(data_json: str, source: str, num_samples: int, seq_len: int) -> str:
    """A data spec (calibration or evaluation) with its three parameters."""
    return json.dumps(_with_values(json.loads(data_json), DataSpec, {"source": source, "num_samples": num_samples, "seq_len": seq_len}))


def stage(stage_json: str, values: dict[str, Any]) -> str:
    """A stage's settings with its parameters (``None``: a setting the run does not change)."""
    spec = json.loads(stage_json)
    return json.dumps(_with_values(spec, STAGE_CONFIGS[spec["kind"]], values))


def context(context_json: str, experiment: str) -> str:
    """What every step knows of its recipe, with the ``mlflow_experiment`` parameter."""
    return json.dumps({**json.loads(context_json), "experiment": experiment})


def recipe(recipe_json: str, changed_json: str) -> str:
    """The whole recipe with the fields the validation step found changed (``[[path, value], ...]``)."""
    out = json.loads(recipe_json)
    for path, value in json.loads(changed_json):
        set_path(out, path, value)
    return json.dumps(out)
