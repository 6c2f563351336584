"""Training data of the distill stage and the teacher-logit cache.

The training set is ``num_samples`` windows of ``seq_len`` tokens (the same seeded
windows the other stages calibrate on). The cache is the teacher run once over those
windows: its top-k logits and their token ids per position, in one safetensors file
that training reads back row by row, so the teacher is never loaded while the student
trains. It is keyed by what it depends on (teacher weights, windows, k), so a rerun,
a resumed run or a second student reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("llmpress")

CACHE_FILE = "teacher-topk.safetensors"


class WindowDataset:
    """Token windows as the Trainer wants them; ``index`` finds a window's cached logits."""

    def __init__(self, windows: list[list[int]]) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        ids = torch.tensor(self.windows[i], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "index": i}


def cache_key(teacher_dir: str | Path, windows: list[list[int]], top_k: int | None) -> str:
    """What the cache depends on: the teacher's weights, the exact windows and k.
    Weights are fingerprinted by size and their first and last MiB (the safetensors
    header names every tensor): hashing all the bytes of a 70B teacher costs minutes."""
    digest = hashlib.sha256()
    for path in sorted(Path(teacher_dir).glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as f:
            digest.update(f"{path.name}:{size}".encode() + f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    digest.update(json.dumps(windows).encode())
    digest.update(str(top_k).encode())
    return digest.hexdigest()[:16]


def build_teacher_cache(teacher: Any, windows: list[list[int]], top_k: int, dest: Path, device: str, batch_size: int = 8) -> dict[str, float]:
    """Run the teacher once over ``windows``; write top-k logits (bf16) and ids (int32)
    to ``dest`` atomically. Returns its cost: seconds and bytes."""
    import torch
    from safetensors.torch import save_file

    start = time.time()
    values, indices = [], []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            batch = torch.tensor(windows[i : i + batch_size], device=device)
            logits = teacher(input_ids=batch).logits
            top = torch.topk(logits.float(), top_k, dim=-1)
            values.append(top.values.to(torch.bfloat16).cpu())
            indices.append(top.indices.to(torch.int32).cpu())
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{CACHE_FILE}.{os.getpid()}"
    save_file({"values": torch.cat(values), "indices": torch.cat(indices)}, str(tmp), metadata={"top_k": str(top_k)})
    tmp.rename(dest / CACHE_FILE)
    seconds = time.time() - start
    size = (dest / CACHE_FILE).stat().st_size
    log.info("teacher cache: %d windows, top-%d, %.1f MB in %.1fs", len(windows), top_k, size / 1e6, seconds)
    return {"teacher_cache_build_s": seconds, "teacher_cache_bytes": size}


def wait_for_cache(dest: Path, timeout_s: float = 24 * 3600) -> None:
    """Other ranks wait while rank 0 builds the cache (the file appears atomically)."""
    deadline = time.time() + timeout_s
    while not (dest / CACHE_FILE).is_file():
        if time.time() > deadline:
            raise TimeoutError(f"teacher cache {dest / CACHE_FILE} did not appear")
        time.sleep(2)


class TeacherCache:
    """Reads the cached top-k logits of given windows, without loading the whole file."""

    def __init__(self, dest: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(dest / CACHE_FILE), framework="pt")
        self.top_k = int(self._file.metadata()["top_k"])

    def rows(self, indices: list[int], device: Any) -> tuple[Any, Any]:
        """(values [B, L, k], ids [B, L, k]) for the windows ``indices``."""
        import torch

        values = self._file.get_slice("values")
        ids = self._file.get_slice("indices")
        v = torch.stack([values[i : i + 1][0] for i in indices])
        k = torch.stack([ids[i : i + 1][0] for i in indices])
        return v.to(device), k.to(device)
