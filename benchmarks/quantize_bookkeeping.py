"""What the quantize stage spends around llm-compressor: its bookkeeping, function by function.

``at_scale.py`` compares the stage with ``oneshot`` called directly, phase by phase (load,
calibrate, persist/save). This script itemizes the rest: the stage runs on the CPU with
the library's ``oneshot`` call replaced by nothing (its time is the library's, the same
in both paths) and the reload self-check skipped (reported apart by the stage), and every
function the stage calls between its phases is timed. "calibrate" is the stage's own part
of that phase (``oneshot`` skipped); what is left of ``quantize_time_s`` after the phases
and the functions listed is printed as "not itemized".

    python benchmarks/at_scale.py --shape llama3.2-1b --tokenizer DIR --work /tmp/s1b --steps   # builds /tmp/s1b/base
    python benchmarks/quantize_bookkeeping.py --model /tmp/s1b/base --schemes gptq-w4a16 awq-w4a16 w8a8 fp8
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# the stage's calls inside quantize_time_s but outside its phases, by the module that holds them
STAGE_CALLS = ["calibration_samples", "release_calibrated", "count_parameters", "_fit_group_size", "_mixed_precision",
               "size_floor_bytes", "_write_report"]
RESUME_CALLS = ["resume_key", "reuse"]


def timed(owner: Any, name: str, spent: dict[str, float]) -> None:
    """Replace ``owner.name`` by a wrapper that adds its seconds to ``spent[name]``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.time() - start

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved model folder (at_scale.py builds one)")
    parser.add_argument("--schemes", nargs="+", default=["gptq-w4a16"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    os.environ["LLMPRESS_CACHE"] = tempfile.mkdtemp(prefix="bookkeeping-cache-")  # no resume from an earlier run
    import datasets  # noqa: F401 - imports paid before any clock, as at_scale.py's children do
    import llmcompressor  # noqa: F401
    import transformers  # noqa: F401
    from llmpress.components.data import DataSpec, load_texts
    from llmpress.components.stages import quantize
    from llmpress.components.stages.quantize import resume

    spent: dict[str, float] = {}
    for name in STAGE_CALLS:
        timed(quantize, name, spent)
    for name in RESUME_CALLS:
        timed(resume, name, spent)
    quantize.oneshot_quantize = lambda *_args, **_kwargs: None  # the library's own time: not the stage's bookkeeping
    quantize.self_check = lambda *_args, **_kwargs: ""  # reported apart by the stage
    calibration = DataSpec(source="builtin:pydoc-train", num_samples=args.samples, seq_len=args.seq_len, seed=0)
    texts = load_texts(calibration)
    columns = ["load", "calibrate", "persist", *STAGE_CALLS, *RESUME_CALLS, "not itemized"]
    print(f"| scheme | quantize_time_s | {' | '.join(columns)} |")
    print("| --- " * (len(columns) + 2) + "|")
    for scheme in args.schemes:
        spent.clear()
        out = Path(tempfile.mkdtemp(prefix="bookkeeping-out-"))
        try:
            metrics = quantize.run(args.model, out, quantize.QuantizeConfig(scheme=scheme, device="cpu"), calibration, texts)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        phases = [metrics["load_time_s"], metrics["calibrate_time_s"], metrics["persist_time_s"]]
        rest = metrics["quantize_time_s"] - sum(phases) - sum(spent.values())
        figures = [*phases, *(spent.get(name, 0.0) for name in STAGE_CALLS + RESUME_CALLS), rest]
        print(f"| {scheme} | {metrics['quantize_time_s']:.3f} | " + " | ".join(f"{f:.3f}" for f in figures) + " |", flush=True)


if __name__ == "__main__":
    main()
