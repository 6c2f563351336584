"""Search on a real model: the search (screening, then the full evaluation of the
candidates that can still be on the front, ``screen.keep: front``), the full evaluation
of every candidate (``screen: null``) and the search that fully evaluates only the
candidates that can still win (``screen.keep: winner``), one after another into one run
folder. Model steps come from the folder's cache (a first run computes them); before
each run the cached evaluations are dropped, so every run evaluates afresh. Prints the
candidates, the front, the winners and the cost of each run; ``--report-only`` prints
them again from the measured-*.json files.

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/search_bench.py --model builtin:smollm2-135m --out /tmp/search-bench

The space: the single-technique recipes in recipes/ that can meet a 4-bit size budget,
with their settings, as far as the shared 2-core CPU's time allowed: GPTQ W4A16 group 32
with zero points (smollm2-gptq-quality.yaml) and without, nf4 (nf4.yaml, without its
fixed auto_ignore) and round-to-nearest W4 g64 with and without zero points (the
quality table's reference rows). Calibration as smollm2-gptq-quality.yaml (64 x 256
tokens of pydoc-train, seed 0), so that its candidate is that recipe's model. Not in
it: GPTQ g64 (smollm2-gptq.yaml's and demo.yaml's setting: each GPTQ model takes 13
minutes on this CPU alone) and awq-w4a16 (its grid search reruns each layer's
attention or MLP over all calibration windows 20 times per mapping: hours here); see
docs/benchmarks.md for their figures. The full evaluation is what a user would want on
this text: all of pydoc-eval (~8.4k tokens of SmolLM2's tokenizer) in 32 windows of 512
tokens every 256 (each scored token after the first window sees at least 256 tokens of
context), decode latency and a generation sample; the screening scores a few
non-overlapping 512-token windows, without latency, sample or sparsity count.
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

SPACE = {"quantize": [
    {"scheme": "gptq-w4a16", "group_size": 32, "grid": {"symmetric": [False, True]}},
    {"scheme": "nf4"},
    {"scheme": "rtn-w4a16", "group_size": 64, "grid": {"symmetric": [False, True]}},
]}


def recipe(model: str, budget: dict, screen: dict | None, args: argparse.Namespace) -> dict:
    return {
        "name": "search-bench",
        "model": {"source": model},
        "data": {
            "calibration": {"source": "builtin:pydoc-train", "num_samples": 64, "seq_len": 256, "seed": 0},
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


def drop_cached_evaluations(out: Path) -> int:
    """Remove the run folder's cache entries that hold no model (evaluations, selection,
    report), so that a run evaluates afresh and takes only model steps from the cache.
    Returns how many were removed."""
    removed = 0
    for entry in (out / "cache").glob("*.json"):
        if not {"model", "model_out"} & set(json.loads(entry.read_text())):
            entry.unlink()
            removed += 1
    return removed


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
    parser.add_argument("--modes", default="search,full,winner", help="which runs, in order: search (screen.keep: front), full "
                        "(screen: null), winner (screen.keep: winner)")
    parser.add_argument("--report-only", action="store_true", help="print the tables from an earlier run's measured-*.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = {"size_ratio": args.size_ratio, "perplexity_ratio": args.perplexity_ratio}
    screens = {"search": {"windows": args.screen_windows, "margin": args.margin, "keep": "front"}, "full": None,
               "winner": {"windows": args.screen_windows, "margin": args.margin, "keep": "winner"}}
    outcome, walls = {}, {}
    for mode in args.modes.split(","):
        measured = args.out / f"measured-{mode}.json"
        if not args.report_only:
            path = args.out / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(recipe(args.model, budget, screens[mode], args), sort_keys=False))
            dropped = drop_cached_evaluations(args.out / "run")
            print(f"{mode}: {dropped} cached evaluation steps dropped; running", flush=True)
            results, wall, code, steps = run(path, args.out / "run")
            measured.write_text(json.dumps({"results": results, "wall": wall, "code": code, "steps": steps}, indent=1))
        kept = json.loads(measured.read_text())
        outcome[mode] = (kept["results"]["search"], kept["wall"], kept["code"])
        walls[mode] = kept["steps"]
    print(f"\nmodel {args.model}; budget {budget}; full evaluation {args.windows} windows of {args.seq_len} tokens every {args.stride}, "
          f"screening {args.screen_windows} windows of {args.seq_len}, margin {args.margin}\n")
    every = {c["name"]: c for c in outcome["full"][0]["candidates"]} if "full" in outcome else {}
    screened = next((outcome[m][0] for m in ("search", "winner") if m in outcome), None)
    print("| candidate | chain | size ratio | ppl ratio (full) | screen ppl ratio | screen s | full evaluation s | "
          + " | ".join(f"full evaluation in {m}" for m in outcome if m != "full") + " | meets budget |")
    print("|---|---|---|---|---|---|---|" + "---|" * (len(outcome) - ("full" in outcome)) + "---|")
    for c in (screened or outcome["full"][0])["candidates"]:
        full = (every.get(c["name"]) or c)["full"] or {}
        screen = c.get("screen") or {}
        kept = [("yes" if outcome[m][0]["candidates_by_name"][c["name"]]["full"] else "no: " + outcome[m][0]["decision"]["dropped"].get(c["name"], ""))
                for m in outcome if m != "full"]
        verdict = every.get(c["name"]) or c
        print(f"| {c['name']} | {c['label']} | {full.get('size_bytes_ratio', float('nan')):.4f} | {full.get('perplexity_ratio', float('nan')):.4f} | "
              f"{screen.get('perplexity_ratio', float('nan')):.4f} | {screen.get('eval_wall_time_s', float('nan')):.1f} | "
              f"{full.get('eval_wall_time_s', float('nan')):.1f} | " + " | ".join(kept) + f" | {'yes' if verdict['meets_budget'] else verdict['why_not']} |")
    print("\n| mode | fully evaluated | winner | front (size, ppl) | screening s | full evaluations s | evaluation s | "
          "evaluation steps' wall s | llmpress run wall s | of it, model steps that ran s | every model step s | run wall without model steps s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    step_wall = {m: sum(w for s, w in steps.items() if s.startswith("evaluate")) for m, steps in walls.items()}
    # a run whose model steps came from the cache is its evaluations; one that made some is not: subtract them
    ran_models = {m: sum(w for s, w in steps.items() if s.startswith("run-stage")) for m, steps in walls.items()}
    bare = {m: wall - ran_models[m] for m, (_, wall, _) in outcome.items()}
    for mode, (search, wall, *_) in outcome.items():
        cost = search["cost"]
        print(f"| {mode} | {len(search['decision']['full'])} of {len(search['candidates'])} | {search['winner']} | {', '.join(search['front'])} | "
              f"{cost['screen_s']:.1f} | {cost['full_s']:.1f} | {cost['evaluation_s']:.1f} | {step_wall[mode]:.1f} | {wall:.1f} | "
              f"{ran_models[mode]:.1f} | {cost['stages_s']:.1f} | {bare[mode]:.1f} |")
    if "full" in outcome:
        e = outcome["full"][0]["cost"]
        for mode in (m for m in outcome if m != "full"):
            s = outcome[mode][0]["cost"]
            print(f"\n{mode} / every candidate fully: evaluation s {s['evaluation_s'] / e['evaluation_s']:.3f}, "
                  f"evaluation steps' wall {step_wall[mode] / step_wall['full']:.3f}, run wall without model steps {bare[mode] / bare['full']:.3f}, "
                  f"run wall with every model step {(bare[mode] + s['stages_s']) / (bare['full'] + e['stages_s']):.3f}; "
                  f"same winner: {outcome[mode][0]['winner'] == outcome['full'][0]['winner']}")
    print("\nsteps that ran (wall s from start to end of the step's process; eval_wall_time_s is the part inside the evaluation):")
    for mode, steps in walls.items():
        kinds = {"model": [w for s, w in steps.items() if s.startswith("run-stage")],
                 "evaluation": [w for s, w in steps.items() if s.startswith("evaluate")],
                 "other": [w for s, w in steps.items() if not s.startswith(("run-stage", "evaluate"))]}
        print(f"- {mode}: " + "; ".join(f"{k} {len(v)} steps {sum(v):.1f} s" for k, v in kinds.items()))
        print("  " + ", ".join(f"{s} {w:.1f}" for s, w in steps.items()))

if __name__ == "__main__":
    main()
