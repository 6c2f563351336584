"""The recipe: a YAML file that says what to compress, how, and where it runs.

``load_recipe`` returns a typed ``Recipe`` or raises one ``UserError`` carrying one
line per problem: ``field: value — what is allowed``.
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from llmpress import untrusted_yaml
from llmpress.components.data import DataSpec
from llmpress.components.errors import UserError, short
from llmpress.components.models.io import ModelSpec
from llmpress.components.stages.distill import DistillConfig
from llmpress.components.stages.evaluate import EvaluateConfig
from llmpress.components.stages.prune import PruneConfig
from llmpress.components.stages.quantize import QuantizeConfig
from llmpress.search import Candidate, Search, candidates, expand_options
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|K|M|G|T)?$"
K8S_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
MAX_PROBLEMS = 20


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Toleration(Strict):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Scratch(Strict):
    """A volume at ``mount_path``: a new one of ``size`` per pod, or an existing claim."""

    size: str | None = Field(None, pattern=QUANTITY, description="generic ephemeral volume, created and deleted with the pod")
    storage_class: str | None = Field(None, pattern=K8S_NAME)
    pvc: str | None = Field(None, pattern=K8S_NAME, description="name of an existing PersistentVolumeClaim (ReadWriteMany for multi-pod)")
    mount_path: str = Field("/scratch", pattern=r"^/[^:]*$")

    @model_validator(mode="after")
    def _one_source(self) -> Scratch:
        if bool(self.size) == bool(self.pvc):
            raise ValueError("scratch needs exactly one of size (a new volume per pod) or pvc (an existing claim)")
        if self.storage_class and not self.size:
            raise ValueError("scratch.storage_class applies to a new volume; set size, or drop storage_class")
        return self


class Resources(Strict):
    """Where a step runs on the cluster (ignored by the local runner)."""

    gpus: int = Field(0, ge=0, le=64, description="GPUs per pod")
    nodes: int = Field(1, ge=1, le=64, description="pods of a multi-node job (distill only): > 1 submits a Kubeflow TrainJob")
    accelerator: str | None = Field(None, description="resource name of the GPU, default nvidia.com/gpu")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    cpu: str | None = Field(None, pattern=QUANTITY, description="Kubernetes quantity, e.g. '4' or '500m'")
    memory: str | None = Field(None, pattern=QUANTITY, description="Kubernetes quantity, e.g. '32Gi'")
    shm: str | None = Field(None, pattern=QUANTITY, description="RAM-backed /dev/shm size; with gpus > 1 it is mounted even when unset")
    scratch: Scratch | None = Field(None, description="a scratch volume for models larger than the node's disk")

    @model_validator(mode="after")
    def _accelerator_needs_gpus(self) -> Resources:
        if self.accelerator and not self.gpus:
            raise ValueError(f"accelerator {self.accelerator!r} is set but gpus is 0; set gpus >= 1 or drop accelerator")
        return self


class StageCommon(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="lowercase letters, digits and '-', at most 40")
    resources: Resources = Field(default_factory=Resources)


class QuantizeStage(StageCommon, QuantizeConfig):
    kind: Literal["quantize"]


class PruneStage(StageCommon, PruneConfig):
    kind: Literal["prune"]


class DistillStage(StageCommon, DistillConfig):
    kind: Literal["distill"]


class EvaluateStage(StageCommon, EvaluateConfig):
    kind: Literal["evaluate"]


Stage = Annotated[Union[DistillStage, PruneStage, QuantizeStage, EvaluateStage], Field(discriminator="kind")]  # noqa: UP007
STAGE_TYPES: dict[str, type[BaseModel]] = {"distill": DistillStage, "prune": PruneStage, "quantize": QuantizeStage, "evaluate": EvaluateStage}
PRODUCES_MODEL = ("distill", "prune", "quantize")


class Data(Strict):
    calibration: DataSpec = Field(default_factory=lambda: DataSpec(source="builtin:pydoc-train", num_samples=64, seq_len=256))
    evaluation: DataSpec = Field(default_factory=lambda: DataSpec(source="builtin:pydoc-eval", num_samples=64, seq_len=256))


class Evaluation(EvaluateConfig):
    after_each_stage: bool = Field(True, description="evaluate the output of every model-producing stage")
    resources: Resources = Field(default_factory=Resources)


class Tracking(Strict):
    experiment: str = Field("llmpress", min_length=1, max_length=200)
    register_as: str | None = Field(None, min_length=1, max_length=200, description="Model Registry name of the final model; default: the recipe's name")


class Storage(Strict):
    root: str = Field("./llmpress-runs", min_length=1, description="artifact root: a local folder or s3://bucket/prefix")


class Cluster(Strict):
    """What steps need on Kubernetes. Only NAMES of Secrets and ConfigMaps: their values
    reach the pod as environment variables and never enter the recipe or the compiled YAML."""

    s3_secret: str | None = Field("llmpress-s3", pattern=K8S_NAME, description="Secret: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; null for IRSA")
    mlflow_secret: str | None = Field("llmpress-mlflow", pattern=K8S_NAME, description="Secret: MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN")
    config_map: str | None = Field("llmpress-env", pattern=K8S_NAME, description="ConfigMap: MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, ...")
    image_pull_secrets: list[str] = Field(default_factory=list)
    gpu_image: str | None = Field(None, description="image of steps with gpus > 0; default: the release CUDA image")
    cpu_image: str | None = Field(None, description="image of steps without GPUs; default: the release CPU image")
    light_resources: Resources = Field(default_factory=lambda: Resources(cpu="1", memory="4Gi"), description="import and report steps")
    run_as_user: int = Field(1000, ge=1, description="UID of every step (the images' non-root user)")


class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="lowercase letters, digits and '-', at most 40")
    description: str = ""
    model: ModelSpec
    teacher: ModelSpec | None = None
    data: Data = Field(default_factory=Data)
    stages: list[Stage] = Field(default_factory=list, min_length=1, max_length=32, description="the chain to run; with a search, its space builds the chains")
    search: Search | None = Field(None, description="the best chain under a budget, searched over a space of stages (pipelines/search.py)")
    evaluation: Evaluation = Field(default_factory=Evaluation)
    tracking: Tracking = Field(default_factory=Tracking)
    storage: Storage = Field(default_factory=Storage)
    image: str | None = Field(None, description="container image for every step; default: the release images (cluster.gpu_image/cpu_image)")
    cluster: Cluster = Field(default_factory=Cluster)

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        problems = self._search_problems()
        seen: set[str] = set()
        quantized_by: str | None = None
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if stage.name in seen:
                problems.append(f"{where}.name: {stage.name!r} — names must be unique; it is used twice")
            seen.add(stage.name)
            if quantized_by and stage.kind in PRODUCES_MODEL:
                problems.append(f"{where}.kind: {stage.kind!r} — cannot follow quantize stage {quantized_by!r}; put {stage.kind} before quantize")
            if stage.kind == "quantize":
                quantized_by = stage.name
            device = getattr(stage, "device", None)
            if device == "cpu" and stage.resources.gpus:
                problems.append(f"{where}.device: 'cpu' — resources.gpus is {stage.resources.gpus}; use device auto/cuda or gpus: 0")
            if stage.resources.nodes > 1 and (stage.kind != "distill" or not (stage.resources.scratch and stage.resources.scratch.pvc)):
                problems.append(f"{where}.resources.nodes: {stage.resources.nodes} — only a distill stage spans nodes, and it needs "
                                "resources.scratch.pvc (a ReadWriteMany claim that every node mounts)")
        # a distill stage with alpha 0 and its own student (plain fine-tuning: qlora, qat) needs no teacher
        stages = self.stages + [s for _, chain in self.search_candidates() for s in chain] if self.search and not problems else self.stages
        if any(s.kind == "distill" and (s.alpha > 0 or s.student.source == "teacher") for s in stages) and self.teacher is None:
            problems.append("teacher: missing — a distill stage needs a teacher model")
        if self.teacher is not None and not any(s.kind == "distill" for s in stages):
            problems.append("teacher: given — no distill stage uses it; add a distill stage or drop teacher")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _search_problems(self) -> list[str]:
        """A search replaces ``stages``; each option of its space must be a valid stage."""
        if self.search is None:
            return [] if self.stages else ["stages: missing — required (a list of stages, or a search block)"]
        if self.stages:
            return ["stages: given with a search — the search's space builds every candidate's stages; drop stages or search"]
        axes, problems = expand_options(self.search)
        for options in axes.values():
            for where, option in options:
                if option is None:
                    continue
                try:
                    STAGE_TYPES[option["kind"]].model_validate({"name": "probe", **option})
                except ValidationError as err:
                    for e in err.errors(include_url=False):
                        path = f"{where}.{'.'.join(str(p) for p in e['loc'])}"
                        line = f"{path}: {short(e.get('input'))} — {e['msg'].removeprefix('Value error, ')}"
                        if e["type"] == "extra_forbidden":
                            line = f"{path}: unknown key — allowed keys: {', '.join(STAGE_TYPES[option['kind']].model_fields)}, grid"
                        if line not in problems:
                            problems.append(line)
        if not problems:
            found = candidates(self.search, axes)
            if not found:
                problems.append("search.space: no candidate — give at least one stage option (prune, distill, quantize or mixed_precision)")
            elif len(found) > self.search.max_candidates:
                problems.append(f"search.space: {len(found)} candidates — at most search.max_candidates ({self.search.max_candidates}); "
                                "shrink the space or raise it")
        return problems

    def search_candidates(self) -> list[tuple[Candidate, list[Any]]]:
        """Every candidate of the search with its stages typed as the recipe's stages are."""
        if self.search is None:
            return []
        axes, _ = expand_options(self.search)
        return [(c, [STAGE_TYPES[s["kind"]].model_validate(s) for s in c.stages]) for c in candidates(self.search, axes)]

    def stage_json(self, stage: Any) -> str:
        """A stage's config as the JSON a component receives (resources stay here, but a
        distill stage gets the teacher and its resources: it launches its own processes)."""
        if stage.kind == "distill":
            teacher = self.teacher.model_dump(mode="json") if self.teacher else None
            return json.dumps({**stage.model_dump(mode="json"), "teacher": teacher, "image": self.image or self.cluster.gpu_image})
        # exactly what the recipe says: defaults are re-applied on the other side, and a
        # validator that refuses a setting for another method must not see defaults as set
        return stage.model_dump_json(exclude={"resources"}, exclude_unset=True)


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file; local paths become relative to it."""
    path = Path(path)
    if not path.is_file():
        raise UserError.field("recipe", str(path), "file not found" if not path.exists() else "not a file")
    data = untrusted_yaml.load(path, "recipe")  # bounded: size, depth, no aliases, no duplicate keys
    return parse_recipe(data, base_dir=path.parent)


def parse_recipe(data: Any, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe already parsed from YAML/JSON."""
    if not isinstance(data, dict):
        raise UserError.field("recipe", type(data).__name__, "must be a mapping of fields (name, model, stages, ...)")
    if base_dir is not None:
        data = _resolve_paths(data, base_dir)
    try:
        # strict: `gpus: true` or `bits: "4"` is a mistake to report, not a value to convert
        return Recipe.model_validate(data, strict=True)
    except ValidationError as err:
        lines = _format(err)
        if len(lines) > MAX_PROBLEMS:  # a hostile file with 10,000 unknown keys still gets a readable answer
            lines = [*lines[:MAX_PROBLEMS], f"recipe: ... and {len(lines) - MAX_PROBLEMS} more problems"]
        raise UserError(*lines) from None


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    def fix(spec: Any) -> Any:
        if isinstance(spec, dict) and isinstance(spec.get("source"), str):
            src = spec["source"]
            if src.startswith(("./", "../")):
                return {**spec, "source": str((base / src).resolve())}
        return spec

    out = dict(data)
    for key in ("model", "teacher"):
        out[key] = fix(out.get(key)) if key in out else None
        if out[key] is None:
            out.pop(key)
    if isinstance(out.get("data"), dict):
        out["data"] = {k: fix(v) for k, v in out["data"].items()}
    return out


# --- turning pydantic's errors into one clear line each -------------------------------

def _format(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        loc = [p for p in e["loc"]]
        kind_tag = None
        # a discriminated union puts the tag into the path: stages.0.quantize.scheme
        if len(loc) >= 3 and loc[0] == "stages" and isinstance(loc[1], int) and loc[2] in STAGE_TYPES:
            kind_tag = loc.pop(2)
        path = _path(loc)
        kind, msg, value = e["type"], e["msg"], e.get("input")
        if kind == "union_tag_invalid":
            lines.append(f"{path}.kind: {short(value.get('kind'))} — allowed: {', '.join(STAGE_TYPES)}")
        elif kind == "union_tag_not_found":
            lines.append(f"{path}.kind: missing — every stage needs kind: one of {', '.join(STAGE_TYPES)}")
        elif kind == "missing":
            lines.append(f"{path}: missing — required")
        elif kind == "extra_forbidden":
            allowed = _allowed_keys(e["loc"][:-1], kind_tag)
            hint = f"allowed keys: {', '.join(allowed)}" if allowed else "not a known key"
            lines.append(f"{path}: unknown key — {hint}")
        elif kind == "value_error" and not loc:
            lines.extend(m.strip() for m in str(e["ctx"]["error"]).splitlines())
        else:
            msg = msg.removeprefix("Value error, ")
            lines.append(f"{path}: {short(value)} — {msg}")
    return lines


def _path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", part):
            out += f"[{short(part, 40)}]"  # a key from the file is quoted: a newline in it must not break the line
        else:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"


def _allowed_keys(loc: tuple[Any, ...], kind_tag: Any) -> list[str]:
    """The keys a model at ``loc`` accepts, found by walking the Recipe's types."""
    current: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            current = _model_in(current)
            continue
        if part in STAGE_TYPES and part == kind_tag:
            current = STAGE_TYPES[part]
            continue
        model = _model_in(current)
        if model is None or part not in model.model_fields:
            return []
        current = model.model_fields[part].annotation
    model = _model_in(current)
    return list(model.model_fields) if model else []


def _model_in(tp: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as ``X | None`` or ``list[X]``."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType, list, Annotated):
        for arg in typing.get_args(tp):
            found = _model_in(arg)
            if found:
                return found
    return None
