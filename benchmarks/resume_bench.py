"""What a rerun costs against the first run of the same recipe: with nothing changed,
and after editing the last quantize stage's settings.

    python benchmarks/resume_bench.py [--recipe recipes/demo.yaml]

Runs ``llmpress run RECIPE --out DIR`` three times into one fresh folder (the real CLI,
in a subprocess, as a user would): the recipe, the same recipe again, then the recipe
with the last quantize stage's ``group_size`` changed (128 <-> 64). Prints the wall
time of each as a share of the first. Without ``--recipe`` it uses a tiny SparseGPT →
GPTQ recipe on the tests' model.
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
    "stages": [{"name": "sparsegpt", "kind": "prune", "method": "sparsegpt", "sparsity": 0.5},
               {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16"}],
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


def edited(recipe: dict) -> dict | None:
    """The recipe with its last quantize stage's group size changed, or None without one."""
    quantize = [s for s in recipe.get("stages", []) if s.get("kind") == "quantize"]
    if not quantize or recipe["stages"][-1] is not quantize[-1]:
        return None
    quantize[-1]["group_size"] = 64 if quantize[-1].get("group_size", 128) == 128 else 128
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        original = yaml.safe_load(args.recipe.read_text()) if args.recipe else TINY
        recipe.write_text(yaml.safe_dump(original))
        first = run(recipe, Path(tmp) / "out")
        second = run(recipe, Path(tmp) / "out")
        change = edited(original)
        third = None
        if change is not None:
            recipe.write_text(yaml.safe_dump(change))
            third = run(recipe, Path(tmp) / "out")
    print(f"\nrecipe: {args.recipe or 'tiny SparseGPT 50% -> GPTQ (builtin:pydoc-llama-tiny)'}; {os.cpu_count()} CPUs\n")
    print(f"{'run':52s} {'wall s':>8s} {'of first':>9s}")
    print(f"{'-' * 52} {'-' * 8} {'-' * 9}")
    print(f"{'first run':52s} {first:8.1f} {100:8.0f}%")
    print(f"{'rerun, nothing changed (all cached)':52s} {second:8.1f} {100 * second / first:8.1f}%")
    if third is not None:
        print(f"{'rerun, last stage edited (it, its evaluation, report)':52s} {third:8.1f} {100 * third / first:8.1f}%")


if __name__ == "__main__":
    main()
