"""Search on a real model: the search (screening, then the full evaluation of the
candidates that can still win) against the full evaluation of every candidate, in one
invocation, into one run folder (the second run reuses the first's model steps from the
cache, so only evaluations differ). Prints the candidates, the front, both winners and
the cost of each.

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/search_bench.py --model builtin:smollm2-135m --out /tmp/search-bench

The space: the quantize stages of the single-technique recipes in recipes/ that can meet
a 4-bit size budget, group size left to ``auto`` (64 on SmolLM2's 576-wide layers, where
demo.yaml's 128 does not divide): gptq-w4a16 (demo.yaml, smollm2-gptq.yaml) and nf4
(nf4.yaml, without its fixed auto_ignore); and round-to-nearest W4, with and without zero
points (the quality table's reference rows). Not in it, for the shared 2-core CPU's time:
awq-w4a16.yaml (AWQ's per-layer grid search) and a mixed-precision candidate (its
sensitivity pass). Calibration as smollm2-gptq.yaml (16 x 256 tokens). The full evaluation is what a user would want on this text: all of
pydoc-eval (~8.4k tokens of SmolLM2's tokenizer) in 32 windows of 512 tokens every 256
(each scored token after the first window sees at least 256 tokens of context), decode
latency and a generation sample; the screening scores a few non-overlapping 512-token
windows, without latency or sample.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

SPACE = {"quantize": [{"scheme": "gptq-w4a16"}, {"scheme": "nf4"}, {"scheme": "rtn-w4a16"},
                      {"scheme": "rtn-w4a16", "symmetric": True, "name": "rtn-w4a16-sym"}]}


def recipe(model: str, budget: dict, screen: dict | None, args: argparse.Namespace) -> dict:
    return {
        "name": "search-bench",
        "model": {"source": model},
        "data": {
            "calibration": {"source": "builtin:pydoc-train", "num_samples": 16, "seq_len": 256, "seed": 0},
            "evaluation": {"source": "builtin:pydoc-eval", "num_samples": args.windows, "seq_len": args.seq_len},
        },
        "evaluation": {"batch_size": 8, "stride": args.stride, "sample_tokens": 16,
                       "latency": {"batch_sizes": [1], "prompt_tokens": 64, "new_tokens": 16, "repeats": 2}},
        "search": {"budget": budget, "space": SPACE, "parallelism": 2, "screen": screen},
        "tracking": {"experiment": "search-bench"},
    }


STEP = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - INFO - (?:Executing task '([^']+)'|Task '([^']+)' finished with status)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(path: Path, out: Path) -> tuple[dict, float, int, dict[str, float]]:
    """One `llmpress run`: its results, wall seconds, exit code and the wall seconds of
    each step that ran (from kfp.local's lines in run.log; cached steps have none)."""
    log = out / "run.log"
    offset = log.stat().st_size if log.exists() else 0
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "llmpress", "run", str(path), "--out", str(out)], capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode not in (0, 1):
        sys.exit(f"llmpress run {path} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with log.open("rb") as f:
        f.seek(offset)
        lines = ANSI.sub("", f.read().decode("utf-8", "replace")).splitlines()
    started: dict[str, datetime] = {}
    steps: dict[str, float] = {}
    for line in lines:
        match = STEP.match(line)
        if match and match[2]:
            started[match[2]] = datetime.strptime(match[1], "%H:%M:%S.%f")
        elif match and match[3] in started:
            steps[match[3]] = (datetime.strptime(match[1], "%H:%M:%S.%f") - started.pop(match[3])).total_seconds() % 86400
    return json.loads((out / "results.json").read_text()), wall, done.returncode, steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("/tmp/search-bench"))
    parser.add_argument("--size-ratio", type=float, default=0.45)
    parser.add_argument("--perplexity-ratio", type=float, default=1.25)
    parser.add_argument("--windows", type=int, default=32, help="windows of the full evaluation")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256, help="tokens between the full evaluation's window starts")
    parser.add_argument("--screen-windows", type=int, default=2)
    parser.add_argument("--margin", type=float, default=0.05)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = {"size_ratio": args.size_ratio, "perplexity_ratio": args.perplexity_ratio}
    outcome, walls = {}, {}
    for mode, screen in (("search", {"windows": args.screen_windows, "margin": args.margin}), ("every candidate fully", None)):
        path = args.out / f"{mode.split()[0]}.yaml"
        path.write_text(yaml.safe_dump(recipe(args.model, budget, screen, args), sort_keys=False))
        results, wall, code, steps = run(path, args.out / "run")
        (args.out / f"results-{mode.split()[0]}.json").write_text(json.dumps(results, indent=1))
        outcome[mode] = (results["search"], wall, code)
        walls[mode] = steps
    first = outcome["search"][0]
    print(f"model {args.model}; budget {budget}; full evaluation {args.windows} windows of {args.seq_len} tokens every {args.stride}, "
          f"screening {args.screen_windows} windows of {args.seq_len}\n")
    print("| candidate | chain | size ratio | ppl ratio (full) | screen ppl ratio | screen s | full evaluation s | "
          "full evaluation in the search | meets budget |")
    print("|---|---|---|---|---|---|---|---|---|")
    every = {c["name"]: c for c in outcome["every candidate fully"][0]["candidates"]}
    for c in first["candidates"]:
        full = every[c["name"]]["full"]
        print(f"| {c['name']} | {c['label']} | {full['size_bytes_ratio']:.3f} | {full['perplexity_ratio']:.4f} | "
              f"{c['screen']['perplexity_ratio']:.4f} | {c['screen']['eval_wall_time_s']:.1f} | {full['eval_wall_time_s']:.1f} | "
              f"{'yes' if c['full'] else 'no: ' + first['decision']['dropped'].get(c['name'], '')} | "
              f"{'yes' if every[c['name']]['meets_budget'] else every[c['name']]['why_not']} |")
    print("\n| mode | winner | front (size, ppl) | evaluation s | model steps s | total s (steps + evaluation) | llmpress run wall s |")
    print("|---|---|---|---|---|---|---|")
    for mode, (search, wall, *_) in outcome.items():
        cost = search["cost"]
        print(f"| {mode} | {search['winner']} | {', '.join(search['front'])} | {cost['evaluation_s']:.1f} | {cost['stages_s']:.1f} | "
              f"{cost['evaluation_s'] + first['cost']['stages_s']:.1f} | {wall:.1f} |")
    s, e = outcome["search"][0]["cost"], outcome["every candidate fully"][0]["cost"]
    print(f"\nsearch / every candidate fully: evaluation {s['evaluation_s'] / e['evaluation_s']:.2f}, "
          f"total {(s['evaluation_s'] + first['cost']['stages_s']) / (e['evaluation_s'] + first['cost']['stages_s']):.2f}; "
          f"same winner: {outcome['search'][0]['winner'] == outcome['every candidate fully'][0]['winner']}")
    print("\nsteps that ran (wall s from start to end of the step's process; eval_wall_time_s is the part inside the evaluation):")
    for mode, steps in walls.items():
        kinds = {"model": [w for s, w in steps.items() if s.startswith("run-stage")],
                 "evaluation": [w for s, w in steps.items() if s.startswith("evaluate")],
                 "other": [w for s, w in steps.items() if not s.startswith(("run-stage", "evaluate"))]}
        print(f"- {mode}: " + "; ".join(f"{k} {len(v)} steps {sum(v):.1f} s" for k, v in kinds.items()))
        print("  " + ", ".join(f"{s} {w:.1f}" for s, w in steps.items()))


if __name__ == "__main__":
    main()
