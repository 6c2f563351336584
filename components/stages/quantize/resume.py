"""The calibrated model, written once, right after calibration: a quantize stage that
fails or is killed after that point (publishing its output, the reload check, the
upload, a lost pod) reruns without calibrating again.

The compressed tensors are written straight from memory (safetensors, shards of at most
``SHARD_BYTES``) into ``<root>/<key>.partial``, with config.json (the model's config
plus compressed-tensors' quantization config, as llm-compressor's ``save_pretrained``
writes it), the tokenizer and a record of the stage's figures; the folder is renamed to
``<root>/<key>`` only when all of it is there, so a folder under its final name is
complete. That folder is a loadable model directory: the stage's output is its files,
hard-linked (copied across file systems), so the bytes are written once, not twice.
The key is the input model, the stage's settings and the calibration text; a rerun
with any of them changed calibrates afresh. The folder is removed once the stage
succeeded. A kill while the tensors are being written loses them (nothing durable
exists yet); llm-compressor gives no hook to persist a layer as soon as it is done.

Two stages with the same key (two GitOps syncs racing, two users of one scratch volume)
share the folder safely: an advisory lock on ``<key>.lock`` (flock; released by the
kernel when a writer dies) is held exclusively while the folder is written or removed
and shared while it is read, so a writer never meets another's half-written
``.partial`` (a stale one, left by a killed writer, is removed under the lock) and a
folder is never removed while another stage links its files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RECORD = "llmpress-calibrated.json"
SHARD_BYTES = 2 * 2**30  # bounds the index size per file, not memory: tensors are written from where they are


def resume_root() -> Path:
    """``$LLMPRESS_SCRATCH/llmpress-resume`` (the step's scratch volume, which a retried
    pod sees again when it is persistent), else ``$LLMPRESS_CACHE/resume``."""
    scratch = os.environ.get("LLMPRESS_SCRATCH")
    if scratch:
        return Path(scratch) / "llmpress-resume"
    return Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress")) / "resume"


def resume_key(model_dir: str | Path, settings: Any, calibration: Any, texts: list[str]) -> str:
    """What the calibrated model depends on: the input's files (names, sizes, modification
    times), the stage's settings, the calibration spec and its text."""
    files = sorted((p.relative_to(model_dir).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model_dir).rglob("*") if p.is_file())
    digest = hashlib.sha256(json.dumps([files, settings, calibration], sort_keys=True, default=str).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()[:24]


def completed(folder: Path) -> dict[str, Any] | None:
    """The record of a complete calibrated model at ``folder``, or None."""
    record = folder / RECORD
    return json.loads(record.read_text()) if record.is_file() else None


@contextlib.contextmanager
def _locked(folder: Path, exclusive: bool) -> Iterator[None]:
    """Hold the key's advisory lock (exclusive to write or remove, shared to read)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.with_name(folder.name + ".lock")
    while True:
        handle = open(path, "a+b")  # noqa: SIM115 (closed below or after the with-block's body)
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:  # discard() unlinks the file it locked: a lock on that old file protects nothing
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        handle.close()  # releases the lock


def reuse(folder: Path, out_dir: str | Path) -> dict[str, Any] | None:
    """The record of the complete calibrated model at ``folder``, its files published into
    ``out_dir``; None (nothing published) when there is none."""
    if completed(folder) is None:  # the common case, without touching the lock
        return None
    with _locked(folder, exclusive=False):
        record = completed(folder)
        if record is not None:
            publish(folder, out_dir)
        return record


def persist(model: Any, tokenizer: Any, folder: Path, record: dict[str, Any], out_dir: str | Path) -> None:
    """Compress ``model`` in place (compressed-tensors, as llm-compressor's save does),
    write it with ``tokenizer`` and ``record`` as a complete model directory at
    ``folder`` and publish its files into ``out_dir``. When a concurrent stage with the
    same key completed the folder first, its (identical) files are published instead."""
    from compressed_tensors.compressors import ModelCompressor
    from llmcompressor.transformers.compression.compressed_tensors_utils import _retie_embeddings, update_and_save_recipe

    with _locked(folder, exclusive=True):
        if completed(folder) is None:
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # a killed writer's: the lock says none is writing
            partial.mkdir(parents=True)
            compressor = ModelCompressor.from_pretrained_model(model)
            compressor.compress_model(model, skip_compressed=True)
            # llm-compressor's save re-ties embeddings that calibration untied (a table saved once);
            # private in 0.14, but the only way to match what its save_pretrained writes
            _retie_embeddings(model)
            write_tensors(model, partial)
            model.config.save_pretrained(partial)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(partial)
            compressor.update_config(str(partial))
            update_and_save_recipe(model.name_or_path, str(partial))  # recipe.yaml: the modifiers that made it
            tokenizer.save_pretrained(partial)
            (partial / RECORD).write_text(json.dumps(record, indent=1))
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete one (no record)
            os.replace(partial, folder)
        publish(folder, out_dir)


def write_tensors(model: Any, dest: Path) -> None:
    """The model's state dict as safetensors shards (``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` with an index), each tensor stored once."""
    from compressed_tensors.offload import disable_onloading
    from safetensors.torch import save_file

    # after calibration the model is dispatched for sequential onloading: a plain
    # state_dict() would copy every tensor to the GPU and back (measured at 8B: +7 s,
    # +1.6 GiB GPU); the offloaded tensors are read where they are
    with disable_onloading():
        state = model.state_dict()
    tensors: dict[str, Any] = {}
    seen: set[tuple[int, int, Any]] = set()
    for name, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype)
        if identity in seen:  # a tied table: transformers loads it once and ties it again
            continue
        seen.add(identity)
        tensors[name] = tensor.detach().contiguous()
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], dest / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dest / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def publish(folder: Path, out_dir: str | Path) -> None:
    """Put the calibrated model's files into ``out_dir`` (hard links; copies across file systems)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for source in folder.iterdir():
        if source.name == RECORD or not source.is_file():
            continue
        target = out / source.name
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def discard(folder: Path) -> None:
    """Forget a calibrated model once the stage that made it succeeded (not while another
    stage with the same key is writing or publishing it)."""
    with _locked(folder, exclusive=True):
        shutil.rmtree(folder, ignore_errors=True)
        folder.with_name(folder.name + ".lock").unlink()
