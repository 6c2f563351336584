"""What a rerun with nothing changed costs, against the first run of the same recipe.

    python benchmarks/resume_bench.py [--recipe recipes/demo.yaml]

Runs ``llmpress run RECIPE --out DIR`` twice into one fresh folder (the real CLI, in a
subprocess, as a user would) and prints the wall time of each, the second as a share
of the first. Without ``--recipe`` it uses the tests' tiny GPTQ recipe.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TINY = {
    "name": "bench-resume",
    "model": {"source": "builtin:pydoc-llama-tiny"},
    "data": {"calibration": {"source": "builtin:pydoc-train", "num_samples": 16, "seq_len": 64},
             "evaluation": {"source": "builtin:pydoc-eval", "num_samples": 24, "seq_len": 64}},
    "stages": [{"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16"}],
    "tracking": {"experiment": "bench"},
}


def run(recipe: Path, out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llmpress", "run", str(recipe), "--out", str(out)], capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"llmpress run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = args.recipe
        if recipe is None:
            recipe = Path(tmp) / "recipe.yaml"
            recipe.write_text(yaml.safe_dump(TINY))
        first = run(recipe, Path(tmp) / "out")
        second = run(recipe, Path(tmp) / "out")
    print(f"\nrecipe: {args.recipe or 'tiny GPTQ (builtin:pydoc-llama-tiny)'}; {os.cpu_count()} CPUs\n")
    print(f"{'run':36s} {'wall s':>8s} {'of first':>9s}")
    print(f"{'-' * 36} {'-' * 8} {'-' * 9}")
    print(f"{'first run':36s} {first:8.1f} {100:8.0f}%")
    print(f"{'rerun, nothing changed (all cached)':36s} {second:8.1f} {100 * second / first:8.1f}%")


if __name__ == "__main__":
    main()
