"""The S3 backend of the artifact store (AWS, MinIO, Ceph, any S3-compatible endpoint).

Endpoint, region and credentials come only from the environment (``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``:
on the cluster a Kubernetes Secret), which boto3 reads itself; nothing here prints them.

Large files go up as multipart uploads whose parts move in parallel, each part read
with ``pread`` (memory stays at concurrency × part size, never a whole file), and come
down as parallel ranged GETs written in place with ``pwrite``. Every request is retried
by botocore (``standard`` mode: 5xx, throttling, reset connections) and every part or
whole-file operation again by ``retrying`` with backoff, so a server restart within
``LLMPRESS_S3_RETRY_SECONDS`` is ridden out. Permanent errors become one ``UserError``
line that names the bucket and key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from llmpress.components.artifacts import Stats, Tuning
from llmpress.components.errors import UserError

log = logging.getLogger("llmpress.artifacts")
T = TypeVar("T")

MIN_PART = 5 * 1024 * 1024  # S3's smallest part (all but the last)
MAX_PARTS = 10_000
STREAM_CHUNK = 1024 * 1024
# Codes that no retry can fix, with what the user should do about them.
PERMANENT = {
    "NoSuchBucket": "the bucket does not exist at this endpoint; create it or fix the URI",
    "AccessDenied": "access denied; the credentials in the environment may not use this bucket/key",
    "403": "access denied; the credentials in the environment may not use this bucket/key",
    "AllAccessDisabled": "access to this bucket is disabled",
    "InvalidAccessKeyId": "the endpoint does not know this access key; check AWS_ACCESS_KEY_ID (its Secret)",
    "SignatureDoesNotMatch": "the endpoint rejects the secret key; check AWS_SECRET_ACCESS_KEY (its Secret)",
    "InvalidBucketName": "not a valid bucket name",
    "InvalidRange": "the object is shorter than its manifest says; re-upload the artifact",
    "PreconditionFailed": "the object changed since it was listed (a model source must not change while a pipeline uses it); rerun from the import step",
    "NoSuchKey": "no such object",
    "404": "no such object",
}
PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict"}  # a conditional write lost to another writer
_CONDITIONAL: dict[tuple[str, str], bool] = {}  # (endpoint, bucket) -> honours conditional writes
_PROBE_LOCK = threading.Lock()
TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "NoSuchUpload",
}


def parse(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` → (``bucket``, ``a/b``)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise UserError.field("uri", uri, "an S3 URI is s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def make_client(tuning: Tuning) -> Any:
    """A boto3 S3 client configured from the environment; safe to share between threads."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        retries={"mode": os.environ.get("LLMPRESS_S3_RETRY_MODE", "standard"), "max_attempts": int(os.environ.get("LLMPRESS_S3_MAX_ATTEMPTS", "5"))},
        max_pool_connections=2 * tuning.concurrency + 4,
        connect_timeout=5,
        read_timeout=60,
        # MinIO and most self-hosted endpoints serve buckets as paths, not as host names
        s3={"addressing_style": "path"} if endpoint else {},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)


def error_code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    return str(response.get("Error", {}).get("Code")) if isinstance(response, dict) else None


def is_transient(err: BaseException) -> bool:
    """Worth another try: connection trouble, timeouts, 5xx, throttling, lost uploads."""
    from botocore import exceptions as bx

    if isinstance(err, bx.ConnectionError | bx.ConnectionClosedError | bx.ReadTimeoutError | bx.ResponseStreamingError
                  | bx.IncompleteReadError | bx.ChecksumError | bx.FlexibleChecksumError | ConnectionError | TimeoutError):
        return True
    if isinstance(err, bx.ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error_code(err) in TRANSIENT_CODES or status >= 500 or status == 429
    return type(err).__module__.startswith("urllib3")


def explain(err: BaseException, where: str) -> BaseException:
    """A permanent error as one line naming bucket and key; others pass through."""
    from botocore import exceptions as bx

    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
        return UserError(f"{where}: no S3 credentials in the environment — set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (from a Kubernetes Secret)")
    code = error_code(err)
    if code in PERMANENT:
        return UserError(f"{where}: {code} — {PERMANENT[code]}")
    return err


def retrying(where: str, fn: Callable[[], T], tuning: Tuning, transient: Callable[[BaseException], bool] = is_transient) -> T:
    """``fn()`` again with exponential backoff and jitter while it fails transiently,
    within ``tuning.retry_seconds``; anything else, or the budget spent, ends it."""
    deadline = time.monotonic() + tuning.retry_seconds
    for attempt in range(1, 1000):
        try:
            return fn()
        except UserError:
            raise
        except Exception as err:
            if not transient(err):
                raise explain(err, where) from None
            delay = min(20.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
            if time.monotonic() + delay > deadline:
                raise UserError(f"{where}: {type(err).__name__} ({error_code(err) or str(err)[:80]}) — gave up after {attempt} tries "
                                f"over {tuning.retry_seconds:.0f}s; check the endpoint and retry (finished files are kept)") from None
            log.warning("%s: %s, try %d again in %.1fs", where, error_code(err) or type(err).__name__, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _digests(path: Path, size: int, step: int) -> tuple[str, str]:
    """(SHA-256, the ETag S3 gives a multipart upload of ``step``-sized parts: the MD5 of
    the parts' MD5s, "-", the part count) of a file, in one read. Servers whose ETags
    are not MD5-based never match, and the file is uploaded again: slower, never wrong."""
    digest, md5s = hashlib.sha256(), []
    with open(path, "rb", buffering=0) as f:
        for _ in range(0, size, step):
            data = f.read(step)
            digest.update(data)
            md5s.append(hashlib.md5(data, usedforsecurity=False).digest())
    return digest.hexdigest(), f"{hashlib.md5(b''.join(md5s), usedforsecurity=False).hexdigest()}-{len(md5s)}"


class S3Store:
    """One artifact prefix in one bucket."""

    def __init__(self, uri: str, tuning: Tuning) -> None:
        self.bucket, self.prefix = parse(uri)
        self.tuning = tuning
        self.client = make_client(tuning)
        # parts get their own pool: file tasks wait on parts and must not starve them
        self.parts = ThreadPoolExecutor(tuning.concurrency)
        self.slots = threading.Semaphore(tuning.concurrency + 2)  # parts read and not yet sent: bounds memory

    def close(self) -> None:
        self.parts.shutdown(wait=True)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        return retrying(self.describe(key), fn, self.tuning)

    def _moved(self, n: int) -> None:
        if self.tuning.progress:
            self.tuning.progress(n)

    def _missing_is_none(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` with retries, where a missing object answers None instead of failing."""

        def call() -> Any:
            try:
                return fn()
            except Exception as err:
                if error_code(err) in ("NoSuchKey", "404"):
                    return None
                raise

        return self._call(key, call)

    def read_bytes(self, key: str) -> bytes | None:
        return self._missing_is_none(key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and its ETag (what ``write_if`` compares)."""
        def read() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]

        return self._missing_is_none(key, read) or (None, None)

    @property
    def conditional(self) -> bool:
        """Whether the server honours ``If-None-Match``/``If-Match`` on PUT (AWS since
        2024, SeaweedFS, moto; older MinIO and Ceph ignore them): probed once per
        endpoint and bucket, or set by ``LLMPRESS_S3_CONDITIONAL`` (on/off)."""
        setting = os.environ.get("LLMPRESS_S3_CONDITIONAL", "auto").lower()
        if setting in ("on", "off"):
            return setting == "on"
        where = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "aws", self.bucket)
        with _PROBE_LOCK:
            if where not in _CONDITIONAL:
                _CONDITIONAL[where] = self._probe_conditional()
                log.info("s3://%s: conditional writes %s", self.bucket, "honoured" if _CONDITIONAL[where] else "ignored: commits use the fallback")
        return _CONDITIONAL[where]

    def _probe_conditional(self) -> bool:
        key = f"llmpress-probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(key, b"1")
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=b"2", IfNoneMatch="*")
            except Exception as err:
                return error_code(err) in PRECONDITION
            return False  # overwritten although it existed: the header was ignored
        finally:
            self.delete([key])

    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """PUT ``key`` only if it is still the version ``tag`` names (None: absent);
        False when another writer changed it first."""
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}

        def put() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
                return True
            except Exception as err:
                if error_code(err) in PRECONDITION:
                    return False
                raise

        return self._call(key, put)

    def _head(self, key: str) -> dict[str, Any] | None:
        return self._missing_is_none(key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))

    def stat(self, key: str, sha256: str) -> bool:
        head = self._head(key)
        return head is not None and head.get("Metadata", {}).get("sha256") == sha256

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else int(head["ContentLength"])

    def list(self, prefix: str) -> list[tuple[str, int]]:
        return [(key, size) for key, size, _ in self.list_versions(prefix)]

    def list_versions(self, prefix: str) -> list[tuple[str, int, str]]:
        """(key, size, ETag) of every object under ``prefix``."""
        def listing() -> list[tuple[str, int, str]]:
            base = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            cut = len(self.prefix) + 1 if self.prefix else 0
            return [(o["Key"][cut:], o["Size"], o.get("ETag", "")) for page in pages for o in page.get("Contents", [])]

        return self._call(prefix, listing)

    def delete(self, keys: list[str]) -> None:
        """Delete ``keys``; DeleteObjects answers 200 with per-key errors, which are
        retried while transient and otherwise raised, never ignored."""
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]

            def delete_batch(b: list[dict[str, str]] = batch) -> None:
                errors = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": b, "Quiet": True}).get("Errors") or []
                failed = [e for e in errors if e.get("Code") != "NoSuchKey"]
                if any(e.get("Code") in TRANSIENT_CODES for e in failed):
                    b[:] = [{"Key": e["Key"]} for e in failed]
                    raise ConnectionError(f"{len(failed)} keys not deleted ({failed[0].get('Code')})")  # transient: retried
                if failed:
                    first = failed[0]
                    raise UserError(f"s3://{self.bucket}/{first.get('Key')}: not deleted — {first.get('Code')}: {first.get('Message', '')}"
                                    f"{f' (and {len(failed) - 1} more keys)' if len(failed) > 1 else ''}")

            self._call(keys[i], delete_batch)

    def part_size(self, size: int) -> int:
        return max(self.tuning.part_size, MIN_PART, -(-size // MAX_PARTS))

    # --- upload -----------------------------------------------------------------

    def upload(self, path: Path, key: str, size: int, stats: Stats) -> tuple[str, bool]:
        """Upload one file, reading it once; returns (its SHA-256, whether it was already there)."""
        step = self.part_size(size)
        if size <= step:  # one PUT; the bytes (at most a part) are hashed first, so the object carries its SHA-256
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if self.stat(key, digest):
                return digest, True

            def put() -> None:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={"sha256": digest})
                self._moved(size)

            self._call(key, put)
            return digest, False
        head = self._head(key)
        if head is not None and int(head["ContentLength"]) == size:  # finished by an interrupted run?
            digest, etag = _digests(path, size, step)
            if head.get("ETag", "").strip('"') == etag:
                return digest, True
        # a lost upload (NoSuchUpload, e.g. a server that restarted empty) is transient here: start over
        return self._call(key, lambda: self._multipart(path, key, size, stats)), False

    def _multipart(self, path: Path, key: str, size: int, stats: Stats) -> str:
        """Parts read in order and sent in parallel; the file's SHA-256 is computed from the
        same bytes, in order, by a thread of its own (reading and hashing overlap). A part
        leaves memory once sent and hashed: at most ``concurrency`` + 2 are held at once."""
        full, step = self._key(key), self.part_size(size)
        ranges = {n: (offset, min(step, size - offset)) for n, offset in enumerate(range(0, size, step), 1)}
        upload_id, listed = self._resume(full, ranges)
        if upload_id is None:
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        etags: dict[int, str] = {}
        digest = hashlib.sha256()
        hasher = ThreadPoolExecutor(1)  # one worker: updates apply in part order
        futures: dict[int, Future[str]] = {}
        failed = threading.Event()
        fd = os.open(path, os.O_RDONLY)
        try:
            for n in sorted(ranges):
                self.slots.acquire()
                if failed.is_set():
                    self.slots.release()
                    break
                try:
                    data = os.pread(fd, ranges[n][1], ranges[n][0])
                    hashed = hasher.submit(digest.update, data)
                except BaseException:
                    self.slots.release()
                    raise
                if n in listed and hashlib.md5(data, usedforsecurity=False).hexdigest() == listed[n].strip('"'):
                    etags[n] = listed[n]  # already on the server: only hashed
                    stats.reused_parts += 1
                    hashed.add_done_callback(lambda _: self.slots.release())
                    continue
                futures[n] = self.parts.submit(self._part, data, key, upload_id, n, failed, hashed)
        finally:
            os.close(fd)
            hasher.shutdown(wait=True)
        for n, future in futures.items():
            etags[n] = future.result()  # the first failure raises here
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts})
        return digest.hexdigest()

    def _part(self, data: bytes, key: str, upload_id: str, number: int, failed: threading.Event, hashed: Future[None]) -> str:
        def send() -> str:
            etag = self.client.upload_part(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, PartNumber=number, Body=data)["ETag"]
            self._moved(len(data))
            return etag

        def part_may_succeed(err: BaseException) -> bool:
            # a lost upload is not retried part by part: the whole file starts over (upload());
            # some servers answer a part of a lost upload with a 500, so a 5xx asks ListParts
            if not is_transient(err) or error_code(err) == "NoSuchUpload":
                return False
            status = getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status < 500 or not self._upload_gone(key, upload_id)

        try:
            return retrying(self.describe(f"{key} (part {number})"), send, self.tuning, part_may_succeed)
        except BaseException:
            failed.set()  # the reader stops reading parts of a file that cannot complete
            raise
        finally:
            wait([hashed])  # the bytes are still the hasher's until it is done with them
            self.slots.release()

    def abort_uploads(self, prefix: str) -> None:
        """Abort unfinished multipart uploads under ``prefix`` (an abandoned session's
        parts would otherwise be stored, and billed, forever)."""
        def abort() -> None:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
            for upload in (u for page in pages for u in page.get("Uploads", [])):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])

        self._call(prefix, abort)

    def _upload_gone(self, key: str, upload_id: str) -> bool:
        try:
            self.client.list_parts(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, MaxParts=1)
        except Exception as err:
            return error_code(err) == "NoSuchUpload"
        return False

    def _resume(self, full: str, ranges: dict[int, tuple[int, int]]) -> tuple[str | None, dict[int, str]]:
        """An unfinished multipart upload of this key and the ETags of its parts of the
        right size. The session key does not pin the content: ``_multipart`` keeps a part
        only when the MD5 of the local bytes it reads anyway matches its ETag."""
        found = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full).get("Uploads", [])
        uploads = sorted((u for u in found if u["Key"] == full), key=lambda u: u["Initiated"])
        if not uploads:
            return None, {}
        *stale, latest = uploads
        for upload in stale:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload["UploadId"])
        upload_id = latest["UploadId"]
        pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=full, UploadId=upload_id)
        listed = {p["PartNumber"]: p["ETag"] for page in pages for p in page.get("Parts", [])
                  if p["PartNumber"] in ranges and p["Size"] == ranges[p["PartNumber"]][1]}
        log.info("resuming the upload of s3://%s/%s: %d of %d parts there", self.bucket, full, len(listed), len(ranges))
        return upload_id, listed

    # --- download ---------------------------------------------------------------

    def download(self, key: str, path: Path, size: int, tag: str | None = None) -> None:
        """Parallel ranged GETs into ``path``; with ``tag``, every one carries ``If-Match``
        so that bytes of another version of the object are refused, never mixed in."""
        step = self.part_size(size)
        with open(path, "wb") as f:
            f.truncate(size)
        fd = os.open(path, os.O_WRONLY)
        try:
            if size <= step:
                self._call(key, lambda: self._range(fd, key, 0, size, size, tag, whole=True))
            else:
                futures = [self.parts.submit(self._call, f"{key} (bytes {o}-)", lambda o=o: self._range(fd, key, o, min(step, size - o), size, tag))
                           for o in range(0, size, step)]
                for future in futures:
                    future.result()
        finally:
            os.close(fd)

    def _range(self, fd: int, key: str, offset: int, length: int, size: int, tag: str | None, whole: bool = False) -> None:
        extra = ({} if whole else {"Range": f"bytes={offset}-{offset + length - 1}"}) | ({"IfMatch": tag} if tag else {})
        response = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)
        total = response["ContentLength"] if whole else int(str(response.get("ContentRange", "/-1")).rpartition("/")[2] or -1)
        if total != size:  # a manifest (or a listing) that lies about the size is refused, never written past
            raise UserError(f"{self.describe(key)}: {total} bytes where {size} were expected — the object changed; re-upload it")
        body, position = response["Body"], offset
        for chunk in body.iter_chunks(STREAM_CHUNK):
            os.pwrite(fd, chunk, position)
            position += len(chunk)
            self._moved(len(chunk))
        if position != offset + length:
            raise ConnectionError(f"short read: {position - offset} of {length} bytes")
