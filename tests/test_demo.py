"""The README's main job, exactly: recipes/demo.yaml through `llmpress run` (≈3 min on 2 cores)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import ROOT, run_cli


def run_recipe(recipe: str, out) -> tuple[str, dict]:
    """`llmpress run RECIPE` from the repository root, tracking local (no MLFLOW_TRACKING_URI
    from the caller's environment); its stdout and results.json."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = run_cli("run", recipe, "--out", str(out), cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_demo_recipe_meets_its_promises(tmp_path):
    stdout, results = run_recipe("recipes/demo.yaml", tmp_path / "demo")
    assert "stage     kind      size MB" in stdout
    (gptq,) = results["stages"]
    # the bar: quantized size < 40% of the baseline, perplexity within 10%
    assert gptq["metrics"]["size_bytes"] < 0.40 * results["baseline"]["metrics"]["size_bytes"]
    assert abs(gptq["metrics"]["perplexity"] / results["baseline"]["metrics"]["perplexity"] - 1) < 0.10


@pytest.mark.slow
def test_readme_main_recipe_runs_a_real_pretrained_model(tmp_path):
    """recipes/smollm2-gptq.yaml, the README's main command: SmolLM2-135M from its GGUF file."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "smollm2"
    _, results = run_recipe("recipes/smollm2-gptq.yaml", out)
    baseline = results["baseline"]["metrics"]
    assert baseline["num_parameters"] >= 100e6 and baseline["source_gguf_quantization"] == "Q4_1"
    gptq, news = results["stages"]
    assert gptq["metrics"]["group_size"] == 64
    # measured: 15.3 -> 18.6 (x1.21); a 4-bit GPTQ that lost more than 30% would be broken
    assert 1.0 < gptq["metrics"]["perplexity_ratio"] < 1.30
    assert gptq["metrics"]["size_bytes_ratio"] < 0.45  # the tied 49152x576 embedding stays bf16: 21% of the parameters
    assert news["metrics"]["perplexity_ratio"] > 1.0 and news["metrics"]["baseline_perplexity"] != baseline["perplexity"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(results["tracking"]["parent_run_id"]).data.params["source_gguf_quantization"] == "Q4_1"


@pytest.mark.gpu
def test_quality_recipe_keeps_smollm2_within_ten_percent(tmp_path):
    """recipes/smollm2-gptq-quality.yaml: the x1.21 investigation's answer holds through
    `llmpress run` (measured x1.053 on the H200, benchmarks/quality_smollm2.py)."""
    _, results = run_recipe("recipes/smollm2-gptq-quality.yaml", tmp_path / "quality")
    gptq, _ = results["stages"]
    assert gptq["metrics"]["group_size"] == 32
    assert 1.0 < gptq["metrics"]["perplexity_ratio"] <= 1.10
    assert gptq["metrics"]["size_bytes_ratio"] < 0.45
