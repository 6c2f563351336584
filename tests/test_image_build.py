"""The CPU image, built for real and run: `images/build.sh --local-base cpu` builds it with
buildah (public bases cannot be pulled here, so from a Debian 12 base made by
debootstrap), then inside it, as uid 1000: `llmpress validate` and `compile`, a full
`llmpress run` of a tiny recipe, the chart's register and GitOps submit Jobs' own commands
against a KFP API server on 127.0.0.1, and the chart's MLflow login script.

Slow (the build alone takes about half an hour on this 2-core machine when nothing is
cached; docs/cluster.md has the figures). Needs root, buildah and debootstrap (Debian's
packages); without them it is skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_recipe
from test_helm import (
    GPU_VALUES,
    find,
    helm,  # noqa: F401  (the pytest fixture)
    render,
)
from test_submit import FakeKFP

pytestmark = pytest.mark.slow

IMAGE = "ghcr.io/llmpress/llmpress-cpu"
TOKEN = "kfp-token-for-the-jobs"


@pytest.fixture(scope="module")
def cpu_image() -> str:
    """The image built by images/build.sh (buildah's layer cache makes a rebuild quick), or
    $LLMPRESS_CPU_IMAGE: an image built before (its build is then not part of the test)."""
    if os.environ.get("LLMPRESS_CPU_IMAGE"):
        return os.environ["LLMPRESS_CPU_IMAGE"]
    if os.geteuid() != 0 or not shutil.which("buildah") or not shutil.which("debootstrap"):
        pytest.skip("needs root, buildah and debootstrap: apt-get install -y buildah debootstrap")
    from llmpress import __version__

    started = time.monotonic()
    env = {**os.environ, "BUILDER": "buildah"}
    build = subprocess.run([str(ROOT / "images" / "build.sh"), "--local-base", "cpu"], env=env, capture_output=True, text=True, timeout=3 * 3600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    image = f"{IMAGE}:{__version__}"
    size = json.loads(subprocess.run(["buildah", "images", "--json", image], capture_output=True, text=True, check=True).stdout)[0]["size"]
    print(f"built {image} in {time.monotonic() - started:.0f} s, {size}")
    return image


def in_image(image: str, *command: str, volumes: dict[Path, str] | None = None, env: dict[str, str] | None = None,
             timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run a command in a fresh container of the image, as uid 1000, on the host's network
    (the test servers listen on 127.0.0.1)."""
    container = subprocess.run(["buildah", "from", "--pull=never", image], capture_output=True, text=True, check=True).stdout.strip()
    try:
        args = ["buildah", "run", "--isolation", "chroot", "--user", "1000:1000"]
        for host, inside in (volumes or {}).items():
            args += ["--volume", f"{host}:{inside}"]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        return subprocess.run([*args, container, "--", *command], capture_output=True, text=True, timeout=timeout)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)


def shared_dir(path: Path) -> Path:
    """A folder uid 1000 in the container can write (the test runs as root)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def test_image_runs_as_uid_1000_with_the_llmpress_cli(cpu_image):
    result = in_image(cpu_image, "sh", "-c", "id -u; id -g; llmpress --help")
    assert result.returncode == 0, result.stderr
    uid, gid, *_ = result.stdout.splitlines()
    assert (uid, gid) == ("1000", "1000")
    assert "usage: llmpress" in result.stdout


def test_validate_compile_and_a_full_run_inside_the_image(cpu_image, tmp_path):
    work = shared_dir(tmp_path / "work")
    (work / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe()))
    volumes = {work: "/work"}
    validate = in_image(cpu_image, "llmpress", "validate", "/work/recipe.yaml", volumes=volumes)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    compiled = in_image(cpu_image, "llmpress", "compile", "/work/recipe.yaml", "-o", "/work/pipeline.yaml", volumes=volumes)
    assert compiled.returncode == 0, compiled.stderr
    assert yaml.safe_load_all((work / "pipeline.yaml").read_text()).__next__()["pipelineInfo"]["name"] == "tiny-gptq"
    started = time.monotonic()
    run = in_image(cpu_image, "llmpress", "run", "/work/recipe.yaml", "--out", "/work/out", volumes=volumes, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"llmpress run in the image: {time.monotonic() - started:.0f} s")
    results = json.loads((work / "out" / "results.json").read_text())
    assert "gptq" in json.dumps(results) and (work / "out" / "report.md").is_file()


def _job_script(manifests: list[dict], job: str) -> str:
    return find(manifests, "Job", job)["spec"]["template"]["spec"]["containers"][0]["args"][0]


def test_the_charts_register_and_submit_jobs_run_in_the_image(cpu_image, helm, tmp_path):  # noqa: F811
    manifests = render(helm, "-f", str(GPU_VALUES))
    recipes = shared_dir(tmp_path / "recipes")
    for name, text in find(manifests, "ConfigMap", "rel-llmpress-recipes")["data"].items():
        (recipes / name).write_text(text)
    token = shared_dir(tmp_path / "token")
    (token / "token").write_text(TOKEN)
    kfp = FakeKFP(token=TOKEN)
    try:
        # the Jobs' env, but the token under /etc: `buildah run` mounts its own tmpfs on /run
        volumes = {recipes: "/etc/llmpress", token: "/etc/kfp-token"}
        env = {"KF_PIPELINES_ENDPOINT": kfp.url, "KF_PIPELINES_SA_TOKEN_PATH": "/etc/kfp-token/token", "HOME": "/tmp"}
        for job in ("rel-llmpress-register", "rel-llmpress-submit", "rel-llmpress-submit"):  # the second submit: a resync
            result = in_image(cpu_image, "sh", "-c", _job_script(manifests, job), volumes=volumes, env=env, timeout=900)
            assert result.returncode == 0, f"{job}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        versions = sorted(v["display_name"] for v in kfp.versions)
        assert "llama-gptq-0.1.0-r1" in versions and "llama-gptq-eval-gpu-0.1.0-r1" in versions
        assert len(kfp.runs) == 2  # one per recipe; the resync started nothing
        assert all(r["service_account"] == "rel-llmpress-runner" for r in kfp.runs)
        assert TOKEN not in result.stdout + result.stderr
    finally:
        kfp.close()


def test_the_charts_mlflow_login_script_runs_in_the_image(cpu_image, helm, tmp_path):  # noqa: F811
    manifests = render(helm)
    work = shared_dir(tmp_path / "auth")
    (work / "prepare_auth.py").write_text(find(manifests, "ConfigMap", "rel-llmpress-mlflow-auth")["data"]["prepare_auth.py"])
    env = {"AUTH_DATABASE_URI": "sqlite:////work/basic_auth.db", "AUTH_DEFAULT_PERMISSION": "READ", "MLFLOW_AUTH_CONFIG_PATH": "/work/basic_auth.ini",
           "PIPELINE_USERNAME": "pipelines", "PIPELINE_PASSWORD": "a-long-enough-password", "HOME": "/tmp"}
    result = in_image(cpu_image, "python", "/work/prepare_auth.py", volumes={work: "/work"}, env=env, timeout=600)
    assert result.returncode == 0 and "user pipelines created" in result.stdout, result.stderr[-2000:]
