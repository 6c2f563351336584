"""`llmpress submit` and `llmpress register` through the real kfp.Client, against a small
HTTP server on 127.0.0.1 that speaks the part of the KFP v2beta1 REST API the client uses
(healthz, experiments, runs, pipelines, upload). What this proves: the arguments, the
package the client sends, auth headers, idempotency and the error lines. What it does
not: that a real KFP backend accepts the package and runs it (no KFP server here)."""

from __future__ import annotations

import email.policy
import json
import threading
import uuid
from dataclasses import dataclass
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from conftest import run_cli, tiny_recipe

TOKEN = "tok-3f1e-not-a-real-token"
CANARY = "canary-S3cr3t-do-not-print"


class FakeKFP:
    """In-memory KFP: just enough state to answer the client's calls."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.experiments: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.pipelines: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.uploads: list[bytes] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                server.requests.append((method, url.path, dict(self.headers)))
                if url.path.endswith("/healthz"):
                    return self._reply(200, {"multi_user": False})
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._reply(401, {"message": "missing or wrong token"})
                self._reply(*server.answer(method, url.path, query, self))

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def _match(items: list[dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
        if "filter" not in query:
            return items
        out = items
        for p in json.loads(query["filter"])["predicates"]:
            value = p.get("stringValue", p.get("string_value"))
            if p["operation"] in (1, "EQUALS"):
                out = [i for i in out if i.get(p["key"]) == value]
            elif p["operation"] in (9, "IS_SUBSTRING"):
                out = [i for i in out if value in i.get(p["key"], "")]
        return out

    def answer(self, method: str, path: str, query: dict[str, str], req: Any) -> tuple[int, dict[str, Any]]:
        body: Any = None
        if method == "POST":
            length = int(req.headers.get("Content-Length", 0))
            if req.headers.get("Content-Type", "").startswith("multipart/"):
                raw = f"Content-Type: {req.headers['Content-Type']}\r\n\r\n".encode() + req.rfile.read(length)
                parts = BytesParser(policy=email.policy.default).parsebytes(raw).iter_parts()
                body = next(p for p in parts if p.get_param("name", header="content-disposition") == "uploadfile").get_payload(decode=True)
                self.uploads.append(body)
            else:
                body = json.loads(req.rfile.read(length) or b"{}")
        api = "/apis/v2beta1/"
        if path == api + "experiments" and method == "GET":
            return 200, {"experiments": self._match(self.experiments, query)}
        if path == api + "experiments" and method == "POST":
            exp = {**body, "experiment_id": str(uuid.uuid4())}
            self.experiments.append(exp)
            return 200, exp
        if path == api + "runs" and method == "GET":
            runs = [r for r in self.runs if r["experiment_id"] == query.get("experiment_id", r["experiment_id"])]
            return 200, {"runs": self._match(runs, query)}
        if path == api + "runs" and method == "POST":
            run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING"}
            self.runs.append(run)
            return 200, {k: v for k, v in run.items() if k != "pipeline_spec"}
        if path.startswith(api + "runs/") and method == "GET":
            (run,) = [r for r in self.runs if r["run_id"] == path.rsplit("/", 1)[1]]
            return 200, {"run_id": run["run_id"], "display_name": run["display_name"], "state": "SUCCEEDED"}
        if path == api + "pipelines" and method == "GET":
            return 200, {"pipelines": self._match(self.pipelines, query)}
        if path == api + "pipelines/upload":
            pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": query["name"]}
            self.pipelines.append(pipeline)
            self.versions.append({"pipeline_id": pipeline["pipeline_id"], "pipeline_version_id": str(uuid.uuid4()), "display_name": query["name"]})
            return 200, pipeline
        if path.startswith(api + "pipelines/") and path.endswith("/versions"):
            pid = path.split("/")[-2]
            return 200, {"pipeline_versions": self._match([v for v in self.versions if v["pipeline_id"] == pid], query)}
        if path == api + "pipelines/upload_version":
            version = {"pipeline_id": query["pipelineid"], "pipeline_version_id": str(uuid.uuid4()), "display_name": query["name"]}
            self.versions.append(version)
            return 200, version
        return 404, {"message": f"no route {method} {path}"}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def kfp_server():
    server = FakeKFP()
    yield server
    server.close()


@pytest.fixture
def gpu_recipe(write_recipe):
    stage = {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16",
             "resources": {"gpus": 2, "node_selector": {"pool": "h100"}, "shm": "32Gi"}}
    return write_recipe(tiny_recipe(stages=[stage], storage={"root": "s3://bucket/runs"}))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """The CLI's main() in this process (a subprocess per call costs seconds of imports);
    the real entry point in a subprocess is tested once, for the unreachable host."""
    from llmpress.cli import main

    def call(*args: str, env: dict[str, str] | None = None) -> Result:
        with monkeypatch.context() as m:
            for key, value in (env or {}).items():
                m.setenv(key, value)
            capsys.readouterr()
            code = main(list(args))
            out, err = capsys.readouterr()
        return Result(code, out, err)

    return call


@pytest.fixture
def submit(cli):
    def call(recipe, server, *extra: str, env: dict[str, str] | None = None) -> Result:
        return cli("submit", str(recipe), "--host", server.url, *extra, env=env)

    return call


def test_submit_creates_a_run_and_prints_its_url(submit, kfp_server, gpu_recipe):
    result = submit(gpu_recipe, kfp_server, "--experiment", "team-a")
    assert result.returncode == 0, result.stderr
    (run,) = kfp_server.runs
    assert result.stdout.splitlines()[-1] == f"{kfp_server.url}/#/runs/details/{run['run_id']}"
    assert kfp_server.experiments[0]["display_name"] == "team-a"
    assert run["experiment_id"] == kfp_server.experiments[0]["experiment_id"]


def test_submit_sends_the_compiled_pipeline_with_its_platform_spec(submit, kfp_server, gpu_recipe):
    result = submit(gpu_recipe, kfp_server, "--service-account", "rel-llmpress-runner")
    assert result.returncode == 0, result.stderr
    (run,) = kfp_server.runs
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-gptq"
    (stage,) = [e for name, e in spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items()
                if name.startswith("exec-run-stage-")]
    assert stage["nodeSelector"]["labels"] == {"pool": "h100"}
    assert stage["emptyDirMounts"][0] == {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "32Gi"}
    assert run["service_account"] == "rel-llmpress-runner"


def test_submit_with_a_revision_is_idempotent(submit, kfp_server, gpu_recipe):
    first = submit(gpu_recipe, kfp_server, "--revision", "3f9c2a1e7b4d")
    again = submit(gpu_recipe, kfp_server, "--revision", "3f9c2a1e7b4d")
    later = submit(gpu_recipe, kfp_server, "--revision", "77aa00bb11cc")  # a new commit, same recipe
    assert [r.returncode for r in (first, again, later)] == [0, 0, 0], first.stderr + again.stderr
    assert len(kfp_server.runs) == 1
    assert first.stdout.startswith("submitted: tiny-gptq k")
    assert again.stdout.startswith("already submitted: ") and later.stdout.startswith("already submitted: ")
    assert again.stdout.splitlines()[1] == first.stdout.splitlines()[1]  # the same run's URL
    assert again.stdout.splitlines()[0].endswith("(PENDING)")


def test_a_changed_recipe_starts_a_new_run_at_the_next_revision(submit, kfp_server, write_recipe):
    submit(write_recipe(tiny_recipe()), kfp_server, "--revision", "aaa")
    changed = tiny_recipe(stages=[{"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16", "group_size": 64}])
    result = submit(write_recipe(changed), kfp_server, "--revision", "bbb")
    assert result.returncode == 0, result.stderr
    assert len(kfp_server.runs) == 2
    assert len({r["display_name"].split()[1] for r in kfp_server.runs}) == 2  # two keys


def test_submit_without_a_revision_always_starts_a_run(submit, kfp_server, gpu_recipe):
    for _ in range(2):
        assert submit(gpu_recipe, kfp_server).returncode == 0
    assert len(kfp_server.runs) == 2


def test_submit_wait_reports_the_final_state(submit, kfp_server, gpu_recipe):
    result = submit(gpu_recipe, kfp_server, "--wait")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "state: SUCCEEDED"


def test_token_file_is_sent_as_bearer_and_never_printed(submit, gpu_recipe, tmp_path):
    server = FakeKFP(token=TOKEN)
    try:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        ok = submit(gpu_recipe, server, "--token-file", str(token_file))
        refused = submit(gpu_recipe, server)
    finally:
        server.close()
    assert ok.returncode == 0, ok.stderr
    assert TOKEN not in ok.stdout + ok.stderr
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("llmpress: error: --token-file: experiment refused (401")


def test_service_account_token_path_env_authenticates(submit, gpu_recipe, tmp_path):
    server = FakeKFP(token=TOKEN)
    try:
        (tmp_path / "sa-token").write_text(TOKEN)
        env = {"KF_PIPELINES_SA_TOKEN_PATH": str(tmp_path / "sa-token")}
        result = submit(gpu_recipe, server, env=env)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert len(server.runs) == 1


def test_unreachable_host_is_one_line_and_exit_2(gpu_recipe):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("submit", str(gpu_recipe), "--host", f"http://127.0.0.1:{port}")
    assert result.returncode == 2
    reason = "cannot reach the Kubeflow Pipelines API ([Errno 111] Connection refused)"
    assert result.stderr.strip().splitlines() == [f"llmpress: error: --host: 'http://127.0.0.1:{port}' — {reason}"]


@pytest.mark.parametrize(("args", "line"), [
    ([], "llmpress: error: --host: missing — give the KFP API URL or set KF_PIPELINES_ENDPOINT"),
    (["--host", "ftp://kfp"], "llmpress: error: --host: 'ftp://kfp' — a URL such as https://kubeflow.example.com/pipeline or http://localhost:8888"),
    (["--host", "http://127.0.0.1:9", "--token-file", "/nonexistent/token"], "llmpress: error: --token-file: '/nonexistent/token' — file not found"),
])
def test_bad_arguments_are_one_line_and_exit_2(cli, monkeypatch, gpu_recipe, args, line):
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    result = cli("submit", str(gpu_recipe), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]


def test_a_server_error_is_one_line_and_exit_1(submit, kfp_server, gpu_recipe):
    kfp_server.answer = lambda *a: (500, {"message": "database is down"})  # type: ignore[method-assign]
    result = submit(gpu_recipe, kfp_server)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["llmpress: error: experiment: the KFP API answered 500 Internal Server Error: database is down"]


def test_register_uploads_the_pipeline_then_one_version_per_label(cli, kfp_server, gpu_recipe):
    first = cli("register", str(gpu_recipe), "--host", kfp_server.url, "--version", "0.1.0-r1")
    again = cli("register", str(gpu_recipe), "--host", kfp_server.url, "--version", "0.1.0-r1")
    upgrade = cli("register", str(gpu_recipe), "--host", kfp_server.url, "--version", "0.1.0-r2")
    assert [r.returncode for r in (first, again, upgrade)] == [0, 0, 0], first.stderr
    assert [p["display_name"] for p in kfp_server.pipelines] == ["tiny-gptq"]
    names = [v["display_name"] for v in kfp_server.versions]
    assert names == ["tiny-gptq", "tiny-gptq-0.1.0-r1", "tiny-gptq-0.1.0-r2"]
    assert first.stdout.startswith("registered: tiny-gptq-0.1.0-r1") and again.stdout.startswith("already registered: ")
    uploaded = list(yaml.safe_load_all(kfp_server.uploads[-1]))
    assert uploaded[0]["pipelineInfo"]["name"] == "tiny-gptq" and "platforms" in uploaded[1]


def test_no_credential_from_the_environment_reaches_the_server(submit, cli, kfp_server, gpu_recipe):
    env = {"AWS_SECRET_ACCESS_KEY": CANARY, "MLFLOW_TRACKING_PASSWORD": CANARY}
    assert submit(gpu_recipe, kfp_server, env=env).returncode == 0
    assert cli("register", str(gpu_recipe), "--host", kfp_server.url, env=env).returncode == 0
    sent = json.dumps(kfp_server.runs) + b"".join(kfp_server.uploads).decode()
    assert CANARY not in sent
    assert "AWS_SECRET_ACCESS_KEY" in sent  # only as the key of a Secret reference


def test_submit_set_sends_run_parameters_with_the_pipeline(submit, kfp_server, gpu_recipe):
    result = submit(gpu_recipe, kfp_server, "--set", "gptq_group_size=64", "--set", "data.calibration.num_samples=8")
    assert result.returncode == 0, result.stderr
    (run,) = kfp_server.runs
    assert run["runtime_config"]["parameters"] == {"gptq_group_size": "64", "calibration_samples": 8}
    inputs = run["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    assert inputs["gptq_group_size"]["defaultValue"] == "auto" and inputs["calibration_samples"]["defaultValue"] == 16


def test_submit_set_with_a_bad_value_is_one_line_and_sends_nothing(submit, kfp_server, gpu_recipe):
    result = submit(gpu_recipe, kfp_server, "--set", "gptq.group_size=48")
    assert result.returncode == 2
    line = ("llmpress: error: gptq_group_size: 48 — allowed: 32, 64, 128, 256, or -1 (per output channel), or 'auto' (the largest of 128, 64, 32 "
            "that divides every quantized layer) (run parameter for stages[0].group_size)")
    assert result.stderr.strip().splitlines() == [line]
    assert kfp_server.requests == []  # refused before the server was asked anything


def test_a_revision_run_is_once_per_effective_recipe(submit, kfp_server, gpu_recipe):
    plain = submit(gpu_recipe, kfp_server, "--revision", "aaa")
    same = submit(gpu_recipe, kfp_server, "--revision", "bbb", "--set", "gptq_group_size=auto")  # the recipe's own value
    other = submit(gpu_recipe, kfp_server, "--revision", "bbb", "--set", "gptq_group_size=64")
    assert [r.returncode for r in (plain, same, other)] == [0, 0, 0], plain.stderr + other.stderr
    assert same.stdout.startswith("already submitted: ") and other.stdout.startswith("submitted: ")
    assert len(kfp_server.runs) == 2


def test_submit_parameters_file_sends_its_values(submit, kfp_server, gpu_recipe, tmp_path):
    (tmp_path / "params.yaml").write_text("gptq_group_size: 64\nevaluation_samples: 12\n")
    result = submit(gpu_recipe, kfp_server, "--parameters", str(tmp_path / "params.yaml"))
    assert result.returncode == 0, result.stderr
    (run,) = kfp_server.runs
    assert run["runtime_config"]["parameters"] == {"gptq_group_size": "64", "evaluation_samples": 12}
