"""The README's main job, exactly: recipes/demo.yaml through `llmpress run` (≈3 min on 2 cores)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import ROOT, run_cli


@pytest.mark.slow
def test_demo_recipe_meets_its_promises(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = tmp_path / "demo"
    result = run_cli("run", "recipes/demo.yaml", "--out", str(out), cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stage     kind      size MB" in result.stdout
    results = json.loads((out / "results.json").read_text())
    (gptq,) = results["stages"]
    # the bar: quantized size < 40% of the baseline, perplexity within 10%
    assert gptq["metrics"]["size_bytes"] < 0.40 * results["baseline"]["metrics"]["size_bytes"]
    assert abs(gptq["metrics"]["perplexity"] / results["baseline"]["metrics"]["perplexity"] - 1) < 0.10
