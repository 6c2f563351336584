"""Artifact transfer speed on loopback: llmpress's store against boto3's defaults and the disk.

    python benchmarks/artifacts_bench.py [--size-gb 1.0] [--endpoint URL] [--concurrency 8] [--part-mb 64]

Without ``--endpoint`` it starts moto's S3 server on 127.0.0.1 (what the tests use);
with one, it uses that endpoint and the AWS_* credentials of the environment. It writes
a model-like artifact (two large weight files and small JSON files) to a temporary
folder, measures how fast the disk reads it back, then times, in the same run:
upload and download through ``artifacts.put_dir``/``get_dir`` (SHA-256 included), the
same files through boto3's default ``upload_file``/``download_file``, and the local
folder store. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MB = 1024 * 1024


def write_artifact(root: Path, total: int) -> Path:
    root.mkdir(parents=True)
    block = os.urandom(16 * MB)
    for name, share in (("model-00001-of-00002.safetensors", 0.7), ("model-00002-of-00002.safetensors", 0.3)):
        with open(root / name, "wb") as f:
            left = int(total * share)
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "tokenizer.json").write_text("{}" * 100_000)
    return root


def size_of(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def disk_read(root: Path) -> float:
    """Seconds to read every file once, in 8 MB chunks (what any uploader must do)."""
    start = time.perf_counter()
    buffer = bytearray(8 * MB)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--endpoint", help="an S3 endpoint to use instead of starting moto")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--part-mb", type=float, default=64)
    args = parser.parse_args()

    proc = None
    if args.endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    else:
        proc, url = start_moto()
        os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    import boto3
    from llmpress.components import artifacts

    tuning = artifacts.Tuning(concurrency=args.concurrency, part_size=int(args.part_mb * MB), retry_seconds=60)
    client = boto3.client("s3")
    bucket = f"bench-{int(time.time())}"
    client.create_bucket(Bucket=bucket)
    rows: list[tuple[str, float]] = []
    try:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            src = write_artifact(Path(tmp) / "src", int(args.size_gb * 1024 * MB))
            total = size_of(src)
            disk_read(src)  # once to settle the page cache the same way for everyone
            rows.append(("disk read (8 MB chunks)", disk_read(src)))
            rows.append(("llmpress put_dir (S3)", timed(lambda: artifacts.put_dir(src, f"s3://{bucket}/llmpress", tuning))))
            rows.append(("llmpress get_dir (S3)", timed(lambda: artifacts.get_dir(f"s3://{bucket}/llmpress", Path(tmp) / "dst1", tuning))))
            shutil.rmtree(Path(tmp) / "dst1")
            files = [p for p in src.rglob("*") if p.is_file()]
            rows.append(("boto3 upload_file (defaults)", timed(lambda: [client.upload_file(str(p), bucket, f"boto3/{p.name}") for p in files])))
            (Path(tmp) / "dst2").mkdir()
            dst2 = Path(tmp) / "dst2"
            rows.append(("boto3 download_file (defaults)", timed(lambda: [client.download_file(bucket, f"boto3/{p.name}", str(dst2 / p.name)) for p in files])))
            shutil.rmtree(Path(tmp) / "dst2")
            rows.append(("llmpress put_dir (local folder)", timed(lambda: artifacts.put_dir(src, str(Path(tmp) / "store"), tuning))))
            rows.append(("llmpress put_dir rerun, unchanged (S3)", timed(lambda: artifacts.put_dir(src, f"s3://{bucket}/llmpress", tuning))))
    finally:
        if proc:
            proc.kill()
    disk = total / MB / rows[0][1]
    print(f"\nartifact: {total / MB:.0f} MB in 4 files; concurrency {args.concurrency}, part {args.part_mb:g} MB; "
          f"server: {args.endpoint or 'moto (python -m moto.server) on 127.0.0.1'}; {os.cpu_count()} CPUs\n")
    print(f"{'operation':40s} {'seconds':>8s} {'MB/s':>8s} {'% of disk':>9s}")
    print(f"{'-' * 40} {'-' * 8} {'-' * 8} {'-' * 9}")
    for name, seconds in rows:
        speed = total / MB / seconds
        print(f"{name:40s} {seconds:8.2f} {speed:8.0f} {100 * speed / disk:8.0f}%")


if __name__ == "__main__":
    main()
