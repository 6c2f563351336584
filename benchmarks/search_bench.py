"""Search on a real model: the search (screening, then the full evaluation of the
candidates that can still win) against the full evaluation of every candidate, in one
invocation, into one run folder (the second run reuses the first's model steps from the
cache, so only evaluations differ). Prints the candidates, the front, both winners and
the cost of each.

    python benchmarks/search_bench.py --model builtin:smollm2-135m --out /tmp/search-bench

The search's space holds the stages of single-technique recipes in recipes/: demo.yaml
(gptq-w4a16, group 128), nf4.yaml and int8.yaml (8-bit: over a 4-bit size budget, on the
front), and a sensitivity-guided mixed-precision gptq candidate. Kept small for a shared
2-core CPU: 4 candidates, 16 calibration sequences of 128 tokens, 16 evaluation windows.
Not run to completion yet (docs/benchmarks.md, Search, says why); the figures there
come from the toy search, benchmarks/search_toy.yaml.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

SPACE = {
    "quantize": [{"scheme": "gptq-w4a16", "group_size": 128}, {"scheme": "nf4"}, {"scheme": "int8"}],
    "mixed_precision": [{"scheme": "gptq-w4a16", "group_size": 128, "fill": [1.0]}],
}


def recipe(model: str, budget: dict, screen: dict | None, windows: int) -> dict:
    return {
        "name": "search-bench",
        "model": {"source": model},
        "data": {
            "calibration": {"source": "builtin:pydoc-train", "num_samples": 16, "seq_len": 128},
            "evaluation": {"source": "builtin:pydoc-eval", "num_samples": windows, "seq_len": 256},
        },
        "evaluation": {"batch_size": 8, "sample_tokens": 8, "latency": {"batch_sizes": [1], "prompt_tokens": 32, "new_tokens": 8, "repeats": 1}},
        "search": {"budget": budget, "space": SPACE, "parallelism": 2, "screen": screen},
        "tracking": {"experiment": "search-bench"},
    }


def run(path: Path, out: Path) -> tuple[dict, float, int]:
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "llmpress", "run", str(path), "--out", str(out)], capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode not in (0, 1):
        sys.exit(f"llmpress run {path} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text()), wall, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("/tmp/search-bench"))
    parser.add_argument("--size-ratio", type=float, default=0.45)
    parser.add_argument("--perplexity-ratio", type=float, default=1.25)
    parser.add_argument("--windows", type=int, default=16, help="windows of the full evaluation")
    parser.add_argument("--screen-windows", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = {"size_ratio": args.size_ratio, "perplexity_ratio": args.perplexity_ratio}
    outcome = {}
    for mode, screen in (("search", {"windows": args.screen_windows, "margin": 0.05}), ("every candidate fully", None)):
        path = args.out / f"{mode.split()[0]}.yaml"
        path.write_text(yaml.safe_dump(recipe(args.model, budget, screen, args.windows), sort_keys=False))
        results, wall, code = run(path, args.out / "run")
        (args.out / f"results-{mode.split()[0]}.json").write_text(json.dumps(results, indent=1))
        outcome[mode] = (results["search"], wall, code)
    first = outcome["search"][0]
    print(f"model {args.model}; budget {budget}; full evaluation {args.windows} windows of 256 tokens, screening {args.screen_windows}\n")
    print("| candidate | chain | size ratio | ppl ratio (full) | screen ppl ratio | full evaluation in the search | meets budget |")
    print("|---|---|---|---|---|---|---|")
    every = {c["name"]: c for c in outcome["every candidate fully"][0]["candidates"]}
    for c in first["candidates"]:
        full = every[c["name"]]["full"]
        print(f"| {c['name']} | {c['label']} | {full['size_bytes_ratio']:.3f} | {full['perplexity_ratio']:.4f} | "
              f"{c['screen']['perplexity_ratio']:.4f} | {'yes' if c['full'] else 'no: ' + first['decision']['dropped'].get(c['name'], '')} | "
              f"{'yes' if every[c['name']]['meets_budget'] else every[c['name']]['why_not']} |")
    print("\n| mode | winner | front (size, ppl) | evaluation s | model steps s | total s (steps + evaluation) | llmpress run wall s |")
    print("|---|---|---|---|---|---|---|")
    for mode, (search, wall, _) in outcome.items():
        cost = search["cost"]
        print(f"| {mode} | {search['winner']} | {', '.join(search['front'])} | {cost['evaluation_s']:.1f} | {cost['stages_s']:.1f} | "
              f"{cost['evaluation_s'] + first['cost']['stages_s']:.1f} | {wall:.1f} |")
    s, e = outcome["search"][0]["cost"], outcome["every candidate fully"][0]["cost"]
    print(f"\nsearch / every candidate fully: evaluation {s['evaluation_s'] / e['evaluation_s']:.2f}, "
          f"total {(s['evaluation_s'] + first['cost']['stages_s']) / (e['evaluation_s'] + first['cost']['stages_s']):.2f}; "
          f"same winner: {outcome['search'][0]['winner'] == outcome['every candidate fully'][0]['winner']}")


if __name__ == "__main__":
    main()
