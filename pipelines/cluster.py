"""The cluster side of a compiled pipeline: what every step's pod gets on Kubernetes
(Secret and ConfigMap references, security context, pull secrets), per-kind defaults
for recipes (the chart's values), and Kubeflow's Kubernetes-native ``Pipeline`` /
``PipelineVersion`` resources for clusters that store pipelines as custom resources.

Only NAMES of Secrets and ConfigMaps appear here; their values reach the pod as
environment variables at run time and never enter a recipe or a compiled pipeline.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from kfp import kubernetes
from llmpress import untrusted_yaml
from llmpress.components.errors import UserError
from llmpress.search import AXIS_KIND

KFP_CRD_API = "pipelines.kubeflow.org/v2beta1"
KFP_RUN_LABEL = "pipeline/runid"  # on every pod of a run (KFP's backend sets it; its launcher reads it)
# Secret keys mapped to env vars of the same name: boto3 and MLflow read exactly these.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# Not secret, but cluster-specific: where tracking and S3 live (the chart's ConfigMap).
CONFIG_MAP_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
# Kinds a defaults file may give resources for; import/report use cluster.light_resources.
DEFAULT_KINDS = ("distill", "prune", "quantize", "evaluate")


def apply_cluster(task: Any, cluster: Any) -> None:
    """Secret/ConfigMap env, image pull secrets and a non-root security context on one task.

    KFP's backend adds allowPrivilegeEscalation=false, drop ALL and seccomp RuntimeDefault
    itself (kfp-kubernetes 2.17 exposes only the identity fields): docs/cluster.md."""
    if cluster.s3_secret:
        kubernetes.use_secret_as_env(task, secret_name=cluster.s3_secret, secret_key_to_env={k: k for k in S3_SECRET_KEYS})
    if cluster.mlflow_secret:
        # optional: an MLflow server without auth has no such Secret
        kubernetes.use_secret_as_env(task, secret_name=cluster.mlflow_secret, secret_key_to_env={k: k for k in MLFLOW_SECRET_KEYS}, optional=True)
    if cluster.config_map:
        kubernetes.use_config_map_as_env(task, config_map_name=cluster.config_map, config_map_key_to_env={k: k for k in CONFIG_MAP_KEYS}, optional=True)
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, cluster.image_pull_secrets)
    kubernetes.set_security_context(task, run_as_user=cluster.run_as_user, run_as_group=cluster.run_as_user, run_as_non_root=True)
    # the KFP run's id, from the label KFP's backend puts on every step's pod, for the MLflow
    # tag llmpress.kfp_run: an env var, not an input, so it leaves the step's cache key alone
    kubernetes.use_field_path_as_env(task, env_name="KFP_RUN_ID", field_path=f"metadata.labels['{KFP_RUN_LABEL}']")


# --- defaults per stage kind (the chart's values) -------------------------------------

def load_defaults(path: str | Path) -> dict[str, Any]:
    """Read a defaults file: ``{cluster: {...}, resources: {<kind>: {...}}, storage: {...}}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError.field("--defaults", str(path), "file not found")
    data = untrusted_yaml.load(path, "--defaults") or {}
    if not isinstance(data, dict) or set(data) - {"cluster", "resources", "image", "storage"}:
        raise UserError.field("--defaults", str(path), "a mapping with keys cluster, resources, storage, image")
    unknown = set(data.get("resources") or {}) - set(DEFAULT_KINDS)
    if unknown:
        raise UserError.field("defaults.resources", sorted(unknown)[0], f"allowed kinds: {', '.join(DEFAULT_KINDS)}")
    return data


def with_defaults(recipe: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The raw recipe with the defaults filled in where the recipe says nothing.

    A recipe that sets a block owns it whole: a stage with ``resources`` keeps exactly
    those (no deep merge), so reading the recipe tells where its steps run."""
    out = copy.deepcopy(recipe)
    kinds = defaults.get("resources") or {}
    for stage in out.get("stages") or []:
        if isinstance(stage, dict) and "resources" not in stage and stage.get("kind") in kinds:
            stage["resources"] = copy.deepcopy(kinds[stage["kind"]])
    space = (out.get("search") or {}).get("space") if isinstance(out.get("search"), dict) else None
    for axis, options in (space.items() if isinstance(space, dict) else []):
        kind = AXIS_KIND.get(axis)  # a search's options are stages of their axis's kind
        for option in options if isinstance(options, list) else []:
            if isinstance(option, dict) and "resources" not in option and kind in kinds:
                option["resources"] = copy.deepcopy(kinds[kind])
    evaluation = out.setdefault("evaluation", {})
    if isinstance(evaluation, dict) and "resources" not in evaluation and "evaluate" in kinds:
        evaluation["resources"] = copy.deepcopy(kinds["evaluate"])
    cluster = out.setdefault("cluster", {})
    if isinstance(cluster, dict):
        for key, value in (defaults.get("cluster") or {}).items():
            cluster.setdefault(key, copy.deepcopy(value))
    if defaults.get("storage") and "storage" not in out:
        out["storage"] = copy.deepcopy(defaults["storage"])
    if defaults.get("image") and "image" not in out:
        out["image"] = defaults["image"]
    return out


# --- Kubernetes-native pipeline resources ---------------------------------------------

def k8s_name(text: str, limit: int = 63) -> str:
    """A DNS-1123 name made from free text (pipeline and version names)."""
    name = re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-.")[:limit].strip("-.")
    if not name:
        raise UserError.field("name", text, "needs at least one letter or digit")
    return name


def pipeline_resources(ir_path: str | Path, version: str, namespace: str | None = None, tags: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``Pipeline`` + ``PipelineVersion`` (pipelines.kubeflow.org/v2beta1) for a compiled IR file.

    For KFP installed with the Kubernetes-native API (pipelines stored as custom
    resources): ``kubectl apply`` them, or let Argo CD / Flux sync them from git."""
    docs = list(yaml.safe_load_all(Path(ir_path).read_text(encoding="utf-8")))
    spec = docs[0]
    platform = docs[1] if len(docs) > 1 else None
    info = spec.get("pipelineInfo", {})
    name = k8s_name(info.get("name", "pipeline"))
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    pipeline = {
        "apiVersion": KFP_CRD_API, "kind": "Pipeline", "metadata": dict(meta),
        "spec": {"displayName": info.get("name", name), "description": info.get("description", "")},
    }
    version_name = k8s_name(f"{name}-{version}", limit=253)
    version_spec: dict[str, Any] = {
        "pipelineName": name, "displayName": f"{info.get('name', name)} {version}",
        "description": info.get("description", ""), "pipelineSpec": spec,
    }
    if platform:
        version_spec["platformSpec"] = platform
    if tags:
        version_spec["tags"] = dict(tags)
    pipeline_version = {"apiVersion": KFP_CRD_API, "kind": "PipelineVersion", "metadata": {**meta, "name": version_name}, "spec": version_spec}
    return [pipeline, pipeline_version]


def write_resources(resources: list[dict[str, Any]], output: str | Path) -> Path:
    """Write resources as one multi-document YAML file."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(yaml.safe_dump_all(resources, sort_keys=False), encoding="utf-8")
    return output


def check_version_label(version: str) -> str:
    """A version label usable in a resource name, or one clear error line."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", version):
        raise UserError.field("--version", version, "letters, digits, '.', '_' and '-', at most 63")
    return version


def load_recipe_with_defaults(path: str | Path, defaults_path: str | Path | None) -> Any:
    """``load_recipe``, with the chart's defaults filled in where the recipe is silent."""
    from llmpress.recipe import load_recipe, parse_recipe

    recipe = load_recipe(path)  # the file's own problems first, phrased as always
    if defaults_path is None:
        return recipe
    raw = untrusted_yaml.load(Path(path), "recipe")
    return parse_recipe(with_defaults(raw, load_defaults(defaults_path)), base_dir=Path(path).parent)
