"""What a user sees in MLflow 3's UI after a local run: a real `mlflow server` on
127.0.0.1 over the run's mlflow.db, opened in headless Chromium (Debian's `chromium`,
driven by Playwright). Screenshots go to docs/ (docs/evaluation.md shows them)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, tiny_recipe
from llmpress.components.tracking import links

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, write_recipe_module):
    """A local run of a quantize stage and an explicit evaluate stage on the tiny model."""
    out = tmp_path_factory.mktemp("ui-run") / "out"
    recipe = tiny_recipe(stages=[{"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16"}, {"name": "check", "kind": "evaluate"}],
                         evaluation={"latency": {"batch_sizes": []}, "sample_tokens": 0}, tracking={"experiment": "ui-review"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != links.MLFLOW_UI_ENV}
    result = run_cli("run", str(write_recipe_module(recipe)), "--out", str(out), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def write_recipe_module(tmp_path_factory):
    import yaml

    def write(recipe):
        path = tmp_path_factory.mktemp("ui-recipe") / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="module")
def ui(finished_run, tmp_path_factory):
    """`mlflow server` over the run's database, and a Chromium page."""
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (its driver; it must not download a browser)")
    from servers import mlflow_server

    base = tmp_path_factory.mktemp("ui-server")
    (base / "data").mkdir()
    shutil.copyfile(finished_run / "mlflow.db", base / "data" / "mlflow.db")
    server = mlflow_server(base, base / "data").start()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 1700, "height": 760})
        yield server, page, json.loads((finished_run / "results.json").read_text())
        browser.close()
    server.kill()


def opened(page, server, link: str, wait_for: str):
    """Open one of the run's links (made for `mlflow ui` on its default port) on the test server."""
    page.goto(link.replace(links.LOCAL_MLFLOW_UI, server.url))
    page.get_by_text(wait_for, exact=True).first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    close = page.locator("button[aria-label*='lose']")  # the assistant's side panel hides the tables
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)
    return page.inner_text("body")


def test_the_experiment_opens_on_its_runs_with_the_dataset_column_filled(ui):
    server, page, results = ui
    text = opened(page, server, results["tracking"]["mlflow_experiment_url"], "tiny-gptq")
    assert "/runs" in page.url and "No data available" not in text and "Model training" in text
    assert "pydoc-train" in text and "Calibration" in text and "pydoc-eval" in text and "Evaluation" in text
    page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # unfold the parent: the stages' runs
    page.get_by_text("baseline", exact=True).first.wait_for(timeout=30_000)
    text = page.inner_text("body")
    assert all(name in text for name in ("gptq", "check", "baseline"))
    page.screenshot(path=str(ROOT / "docs" / "mlflow-runs.png"))


def test_each_stage_model_and_its_metrics_appear_in_the_model_view(ui):
    server, page, results = ui
    text = opened(page, server, results["tracking"]["mlflow_models_url"], "gptq")
    assert "baseline" in text and text.count("Ready") == 2 and "tiny-gptq" in text  # the final one registered
    assert "pydoc-eval" in text and "size_bytes" in text  # metrics by evaluation dataset, as columns
    page.screenshot(path=str(ROOT / "docs" / "mlflow-models.png"))
    model = results["stages"][0]["model_id"]
    text = opened(page, server, results["tracking"]["mlflow_models_url"].replace("/models?", f"/models/{model}?"), "perplexity")
    perplexity = results["stages"][0]["metrics"]["perplexity"]
    assert f"{perplexity:.4f}"[:6] in text and "pydoc-eval" in text and "scheme" in text and "gptq-w4a16" in text
    page.screenshot(path=str(ROOT / "docs" / "mlflow-model.png"), full_page=True)
