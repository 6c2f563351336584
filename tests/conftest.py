"""Shared fixtures: tiny models are built once per session, recipes are written to tmp."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = "builtin:pydoc-llama-tiny"

# One torch thread per process, here and in every subprocess the tests start (pipeline
# steps, `llmpress run`): the test models are too small to gain from a second thread,
# and with two processes each spinning two threads on two cores the tiny model's latency
# measurement took 50 times as long (docs/benchmarks.md, "Test suite"). A value the
# caller set stays.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The modules whose fixtures run whole pipelines take minutes each. The README's test
# command runs the suite on two workers, a file to a worker, in this order (-n 2 --dist
# loadfile --no-loadscope-reorder); these start first, the longest first, so that the
# two workers end together instead of one running them alone at the end.
LONG_MODULES = ("test_resume_edit.py", "test_pipeline_local.py", "test_tracking.py", "test_distill.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: every other test keeps its place


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The builtin tiny Llama (pretrained once, cached under $LLMPRESS_CACHE)."""
    from llmpress.components.models.builtin import build_builtin

    return build_builtin("pydoc-llama-tiny")


def tiny_recipe(**overrides: Any) -> dict[str, Any]:
    """A small valid recipe on the tiny model; keyword arguments replace top-level keys."""
    recipe: dict[str, Any] = {
        "name": "tiny-gptq",
        "model": {"source": TINY},
        "data": {
            "calibration": {"source": "builtin:pydoc-train", "num_samples": 16, "seq_len": 64},
            "evaluation": {"source": "builtin:pydoc-eval", "num_samples": 24, "seq_len": 64},
        },
        "stages": [{"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16"}],
        "tracking": {"experiment": "tests"},
    }
    recipe.update(overrides)
    return recipe


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a recipe dict (or raw text) to a YAML file and return its path."""

    def write(recipe: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess (what a user's shell runs)."""
    return subprocess.run([sys.executable, "-m", "llmpress", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS, or moto with LLMPRESS_TEST_S3_SERVER=moto) on 127.0.0.1 for the whole session (tests/servers.py)."""
    from servers import s3_server as make

    server = make(tmp_path_factory.mktemp("s3-server")).start()
    yield server
    server.kill()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the test server, with the AWS variables of the environment pointing at it."""
    import uuid

    import boto3
    from servers import s3_env

    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend) for the whole session."""
    from servers import mlflow_server as make

    base = tmp_path_factory.mktemp("mlflow-server")
    server = make(base, base / "data").start()
    yield server
    server.kill()


def model_steps(recipe: dict[str, Any]) -> list[str]:
    """The names of a recipe's model steps, in stage order (named by their chain of stages)."""
    from llmpress.pipeline import model_step_names
    from llmpress.recipe import parse_recipe

    parsed = parse_recipe(recipe)
    return model_step_names(parsed, parsed.stages)


def executed(out: Path) -> list[list[str]]:
    """The steps of `llmpress run --out OUT` that ran (wrote outputs), per pipeline run, oldest first."""
    runs = sorted((p for p in (out / "artifacts").iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return [sorted(t.name for t in run.iterdir() if t.is_dir()) for run in runs]


def cli_env_on_s3(server: Any, bucket: str) -> tuple[dict[str, str], Any]:
    """An environment for `llmpress run` against the test S3 server (tracking left to
    the run's own sqlite file), with ``bucket`` created there; and a boto3 client."""
    import boto3
    from servers import s3_env

    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **s3_env(server)}
    client = boto3.client("s3", endpoint_url=server.url, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return env, client


@pytest.fixture(autouse=True)
def fresh_tracking_state():
    """Tracking keeps per-process state (offline after an outage, the spool in use): a test
    that leaves it offline must not turn the next test's records into spool files."""
    yield
    from llmpress.components import tracking

    tracking._state.update(offline=False, spool=None, ids=None)


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory):
    """moto's S3 server, for tests that run on every kind of store."""
    from servers import s3_server

    server = s3_server(tmp_path_factory.mktemp("moto"), "moto").start()
    yield server
    server.kill()


@pytest.fixture(params=("local", "seaweedfs", "moto"))
def store_uri(request, tmp_path, monkeypatch):
    """An empty artifact URI on each kind of store (a folder, SeaweedFS, moto), the
    environment pointing at it."""
    if request.param == "local":
        return str(tmp_path / "store" / "m")
    import uuid

    import boto3
    from servers import s3_env

    server = request.getfixturevalue("s3_server" if request.param == "seaweedfs" else "moto_server")
    for key, value in s3_env(server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    bucket = f"s-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/m"


@pytest.fixture
def server(mlflow_server, monkeypatch, tmp_path):
    """The session's MLflow server as this process's tracking URI, with a fresh spool."""
    from llmpress.components import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    tracking.use_spool(str(tmp_path / "spool"))
    yield mlflow_server
    if mlflow_server.proc is None:  # a test that killed it leaves it running for the next
        mlflow_server.start()
