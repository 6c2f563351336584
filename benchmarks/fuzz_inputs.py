"""Coverage-guided fuzzing (atheris, libFuzzer) of what llmpress reads from outside: the
recipe loader, the artifact manifest reader (into a real folder), and spool replay.

Any exception other than ``UserError``, an input that takes longer than a second, or a
file written outside the target folder is a finding: atheris stops and prints it. The
tests (tests/test_recipe_hostile.py, tests/test_hostile_store.py) run the same kind of
inputs for seconds in CI through hypothesis; this runs for minutes.

    python benchmarks/fuzz_inputs.py recipe   -max_total_time=180 -rss_limit_mb=2048
    python benchmarks/fuzz_inputs.py manifest -max_total_time=120
    python benchmarks/fuzz_inputs.py spool    -max_total_time=60
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["llmpress", "yaml"]):
    from llmpress import untrusted_yaml
    from llmpress.components import artifacts
    from llmpress.components.errors import UserError
    from llmpress.components.tracking import spool
    from llmpress.recipe import parse_recipe

SLOW = 1.0
SEEDS = {
    "recipe": ["name: demo\nmodel: {source: builtin:pydoc-llama-tiny}\nstages:\n  - {name: q, kind: quantize, scheme: int8, resources: {gpus: 1}}\n",
               "a: &a [x, x]\nb: [*a, *a]\n", "lr: 1e-4\n", "[[[]]]"],
}
WORK = Path(tempfile.mkdtemp(prefix="llmpress-fuzz-"))


def everything(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def timed(fn):
    def wrapped(data: bytes) -> None:
        start = time.monotonic()
        fn(data)
        if time.monotonic() - start > SLOW:
            raise RuntimeError(f"an input took {time.monotonic() - start:.2f} s: {data[:200]!r}")

    return wrapped


@timed
def recipe(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        parse_recipe(untrusted_yaml.loads(text, "recipe: 'fuzz'"))
    except UserError as err:
        assert err.problems and all("\n" not in p for p in err.problems), err.problems


@timed
def manifest(data: bytes) -> None:
    """Bytes as the manifest of a store that also holds the objects it names (each
    object ``x`` times its listed size, so that a consistent manifest downloads)."""
    case = WORK / "case"
    shutil.rmtree(case, ignore_errors=True)
    store, target = case / "store", case / "inside" / "dst"
    store.mkdir(parents=True)
    try:
        parsed = json.loads(data)
        for entry in parsed.get("files", []) if isinstance(parsed, dict) else []:
            key = f"{parsed.get('data')}{entry.get('path')}" if isinstance(entry, dict) else ""
            if key and not key.startswith("/") and ".." not in key and "\x00" not in key and isinstance(entry.get("size"), int):
                (store / key).parent.mkdir(parents=True, exist_ok=True)
                (store / key).write_bytes(b"x" * max(0, min(entry["size"], 4096)))
    except Exception:  # the fuzzer's own setup of the store: anything goes
        pass
    (store / artifacts.MANIFEST).write_bytes(data)
    before = everything(WORK)
    try:
        artifacts.get_dir(str(store), target, artifacts.Tuning(concurrency=1))
    except UserError as err:
        assert err.problems and all("\n" not in p for p in err.problems), err.problems
    outside = {p for p in everything(WORK) - before if not p.startswith("case/inside/dst")} - {"case/inside"}
    if outside:
        raise RuntimeError(f"written outside the target: {sorted(outside)[:5]} for {data[:200]!r}")


def _manifest_seed(paths: list[str], data: str = "llmpress-data/0123456789abcdef/") -> str:
    files = [{"path": p, "size": 3, "sha256": hashlib.sha256(b"xxx").hexdigest()} for p in paths]
    return json.dumps({"format": "llmpress-artifact/1", "tree": artifacts.tree_id(files), "data": data, "files": files})


@timed
def spool_replay(data: bytes) -> None:
    """Bytes as one spooled record (and its blob) replayed from a spool folder."""
    case = WORK / "spool"
    shutil.rmtree(case, ignore_errors=True)
    (case / "records").mkdir(parents=True)
    record = data
    try:
        parsed = json.loads(record)
        blob = parsed.get("blob") if isinstance(parsed, dict) else None
        if isinstance(blob, str) and not blob.startswith("/") and ".." not in blob and "\x00" not in blob:
            (case / blob).parent.mkdir(parents=True, exist_ok=True)
            (case / blob).write_bytes(b"blob")
    except Exception:  # the fuzzer's own setup
        pass
    (case / "records" / "00000000000000000001-r.json").write_bytes(record)
    before = everything(WORK)
    try:
        spool.replay(str(case), lambda rec, path: None)
    except UserError as err:
        assert err.problems and all("\n" not in p for p in err.problems), err.problems
    except (KeyError, TypeError) as err:  # apply()'s own inputs are records replay checked; report which field broke
        raise RuntimeError(f"replay crashed on {record[:200]!r}: {err!r}") from None
    outside = {p for p in everything(WORK) - before if not p.startswith("spool/")}
    if outside:
        raise RuntimeError(f"written outside the spool: {sorted(outside)[:5]}")


def main() -> None:
    target = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "recipe"
    fn = {"recipe": recipe, "manifest": manifest, "spool": spool_replay}[target]
    corpus = WORK / f"corpus-{target}"
    corpus.mkdir()
    seeds = {**SEEDS, "manifest": [_manifest_seed(["config.json", "sub/w.bin"]), _manifest_seed(["../x"]), _manifest_seed(["a", "a/b"])],
             "spool": [json.dumps({"op": "log_artifact", "id": "r1", "run": "x", "name": "f.txt", "blob": "blobs/r1/f.txt"}),
                       json.dumps({"op": "log_metrics", "id": "r2", "run": "spool-x", "metrics": {"a": 1}})]}
    for i, seed in enumerate(seeds.get(target, [])):
        (corpus / f"seed-{i}").write_text(seed)
    print(f"fuzzing {target}; corpus {corpus}", flush=True)
    atheris.Setup([*sys.argv, str(corpus)], fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
