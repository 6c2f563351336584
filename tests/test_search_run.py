"""`llmpress run` of a search on the tiny model (kfp.local, MLflow in the run folder): the
winner and its recipe file, the same winner as evaluating every candidate fully (its
models from the cache), the winner's recipe rerunning to the same figures, one MLflow run
per candidate, and the nothing-meets-the-budget path. Four runs into one folder, so
every run after the first reuses the model steps."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import executed, run_cli, tiny_recipe
from llmpress.cli import main

pytestmark = pytest.mark.slow

SPACE = {"prune": ["none", {"method": "magnitude", "sparsity": 0.5}], "quantize": [{"scheme": "nf4"}, {"scheme": "gptq-w4a16", "group_size": 64}]}


def search_recipe(**search):
    block = {"budget": {"size_ratio": 0.6, "perplexity_ratio": 1.5}, "space": SPACE, "parallelism": 2, "screen": {"windows": 4}, **search}
    recipe = tiny_recipe(name="tiny-search", search=block, evaluation={"sample_tokens": 0, "latency": {"batch_sizes": [1], "prompt_tokens": 16,
                                                                                                        "new_tokens": 4, "repeats": 1}})
    del recipe["stages"]
    return recipe


@pytest.fixture(scope="module")
def env():
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_model_dir, env):
    """The search, run once: (run folder, its results, the CLI's output)."""
    base = tmp_path_factory.mktemp("search")
    path = base / "search.yaml"
    path.write_text(yaml.safe_dump(search_recipe()))
    out = base / "out"
    result = run_cli("run", str(path), "--out", str(out), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), result


def test_search_names_a_winner_meeting_the_budget_and_writes_its_recipe(searched, capsys):
    out, results, result = searched
    search = results["search"]
    assert search["winner"] and f"winner: {search['winner']}" in result.stdout
    winner = search["candidates_by_name"][search["winner"]]
    assert winner["meets_budget"] and winner["full"]["size_bytes_ratio"] <= 0.6 and winner["full"]["perplexity_ratio"] <= 1.5
    assert main(["validate", str(out / "winner.yaml")]) == 0
    plain = yaml.safe_load((out / "winner.yaml").read_text())
    assert "search" not in plain and [s["name"] for s in plain["stages"]] == [s["name"] for s in winner["stages"]]
    assert "## Search" in (out / "report.md").read_text() and (out / "search_front.png").stat().st_size > 10_000


def test_a_shared_prefix_ran_once(searched):
    out, _, _ = searched
    steps = executed(out)[0]
    assert len([s for s in steps if s.startswith("run-stage")]) == 5  # 2 quantize on the base, 1 prune, 2 quantize on the pruned


def test_mlflow_has_one_parent_and_one_nested_run_per_candidate(searched):
    from mlflow.tracking import MlflowClient

    out, results, _ = searched
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    parent_id = results["tracking"]["parent_run_id"]
    experiment = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == ["baseline", "c1", "c2", "c3", "c4"]
    pruned = next(r for r in children if r.info.run_name == "c3")
    nested = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{pruned.info.run_id}'")
    assert sorted(r.info.run_name for r in nested) == ["magnitude-50", "nf4"]
    assert {"front.json", "winner.yaml", "results.json", "search_front.png"} <= {a.path for a in client.list_artifacts(parent_id)}
    versions = client.search_model_versions("name = 'tiny-search'")
    assert versions and versions[0].run_id == parent_id


def test_full_evaluation_of_every_candidate_picks_the_same_winner(searched, env):
    out, results, _ = searched
    path = out.parent / "every.yaml"
    path.write_text(yaml.safe_dump(search_recipe(screen=None)))
    result = run_cli("run", str(path), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    every = json.loads((out / "results.json").read_text())["search"]
    assert every["winner"] == results["search"]["winner"]
    assert all(c["full"] for c in every["candidates"])
    assert not [s for s in executed(out)[-1] if s.startswith("run-stage")]  # every model came from the cache


def test_winner_recipe_reruns_to_the_same_figures(searched, env):
    out, results, _ = searched
    result = run_cli("run", str(out / "winner.yaml"), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # the import, the baseline's evaluation and every model step come from the cache (the
    # plain pipeline names a model step by its chain, as the search does); the winner's
    # evaluation runs again (the search evaluated it in its own chain of candidates)
    rerun_steps = set(executed(out)[-1])
    assert not {"import-model", "evaluate"} & rerun_steps
    assert not [s for s in rerun_steps if s.startswith("run-stage")], rerun_steps
    rerun = json.loads((out / "results.json").read_text())["stages"][-1]["metrics"]
    winner = results["search"]["candidates_by_name"][results["search"]["winner"]]["full"]
    assert rerun["size_bytes"] == winner["size_bytes"]
    assert rerun["perplexity"] == pytest.approx(winner["perplexity"], rel=1e-9)


def test_nothing_meeting_the_budget_exits_1_naming_the_constraint_and_the_miss(searched, env):
    out, _, _ = searched
    path = out.parent / "impossible.yaml"
    path.write_text(yaml.safe_dump(search_recipe(budget={"size_ratio": 0.6, "perplexity_ratio": 0.5})))
    result = run_cli("run", str(path), "--out", str(out), env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("llmpress: search: nothing meets the budget; closest c") and "perplexity_ratio" in line and "% over)" in line
    assert json.loads((out / "results.json").read_text())["search"]["winner"] is None
