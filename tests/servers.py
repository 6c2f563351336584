"""Real servers the tests start on 127.0.0.1: an S3-compatible server and MLflow.

Each runs as its own process group so that a test can kill it hard (SIGKILL, the way
a node dies) and start it again on the same port. The S3 server is moto's
(``moto[server]``): MinIO's server is not installable from the package registries this
project may use (docs/dependencies.md). Every wait here is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ACCESS_KEY = "llmpress-test-access-4f7c"
SECRET_KEY = "llmpress-test-secret-9Zq2xW"  # tests assert this never shows up in any output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1 that can be killed and restarted."""

    def __init__(self, name: str, command: list[str], health_path: str, log_dir: Path, env: dict[str, str] | None = None, start_timeout: float = 90) -> None:
        self.name, self.command, self.health_path, self.log_dir = name, command, health_path, log_dir
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        log = (self.log_dir / f"{self.name}.log").open("ab")
        command = [part.replace("{port}", str(self.port)) for part in self.command]
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_dir / self.name}.log")
            try:
                urllib.request.urlopen(self.url + self.health_path, timeout=2)
                return self
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"{self.name} did not answer within {self.start_timeout}s")

    def kill(self) -> None:
        """SIGKILL to the whole process group (the server and any workers it forked)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


def s3_server(log_dir: Path) -> Server:
    return Server("moto-s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"], "/moto-api/", log_dir)


def s3_env(server: Server) -> dict[str, str]:
    """The standard AWS variables a pod gets from its Secret, pointing at the test server."""
    return {"AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}


def mlflow_server(log_dir: Path, data_dir: Path) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    command = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{data_dir / 'mlflow.db'}", "--artifacts-destination", str(data_dir / "artifacts"),
               "--host", "127.0.0.1", "--port", "{port}", "--workers", "1"]
    command[0] = str(Path(sys.executable).with_name("mlflow"))
    # the job runner and its queue consumers are not needed for tracking, and cost 2 cores seconds
    return Server("mlflow", command, "/health", log_dir, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_timeout=120)
