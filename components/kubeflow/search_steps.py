"""The steps a search pipeline adds (``llmpress.search_pipeline`` builds it): evaluating
one candidate, choosing after the screening which candidates get the full evaluation,
and the search's report step.

The candidates' evaluations pass one chain of records along, as the plain pipeline's
evaluations do (``{"baseline", "evaluations"}``); each record also carries the
stages' records of its candidate (``stages``: run ids, model locations), so the report
step finds every candidate's model without a fan-in of artifacts. No kfp here.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from llmpress.components import report, tracking
from llmpress.components.kubeflow import steps
from llmpress.components.report import search as search_report

log = logging.getLogger("llmpress")


@steps.user_errors_exit
def evaluate_candidate(model_in: str, stages_json: str, config_json: str, data_json: str, candidate: str,
                       decision_json: str, evals_json: str) -> tuple[str, dict[str, Any]]:
    """Evaluate a candidate's model against the baseline; returns (the chain with its
    record added, metrics). With a ``decision`` (the screening's), a candidate it did not
    send on is passed along as skipped, without loading its model."""
    chain = json.loads(stages_json)["stages"]
    if decision_json:
        decision = json.loads(decision_json)
        if candidate not in decision["full"]:
            evals = json.loads(evals_json)
            reason = decision["dropped"].get(candidate, "not sent on by the screening")
            evals["evaluations"].append({"target": candidate, "skipped": reason, "stages": chain})
            log.info("candidate %s: full evaluation skipped (%s)", candidate, reason)
            return json.dumps(evals), {}
    evals_out, metrics = steps.evaluate(model_in, config_json, data_json, candidate, "evaluation", evals_json)
    evals = json.loads(evals_out)
    evals["evaluations"][-1]["stages"] = chain
    return json.dumps(evals), metrics


@steps.user_errors_exit
def select_candidates(screened_json: str, search_json: str) -> str:
    """The screening's decision: which candidates the full evaluation measures."""
    search = json.loads(search_json)
    screened = [{"name": e["target"], "metrics": e["metrics"]} for e in json.loads(screened_json)["evaluations"]]
    screen = search["screen"]
    decision = search_report.screen_decision(screened, search["budget"], screen["margin"], screen.get("keep", "front"), search["objective"])
    log.info("screening: %d of %d candidates go on to the full evaluation (%s)", len(decision["full"]), len(screened), ", ".join(decision["full"]))
    for name, reason in decision["dropped"].items():
        log.info("screening: %s stops here: %s", name, reason)
    return json.dumps(decision)


def collect(screened_json: str, evaluated_json: str, decision_json: str, search: dict[str, Any]) -> dict[str, Any]:
    """Every candidate's figures, front, verdict and cost, as results.json's ``search``."""
    screened = {e["target"]: e for e in json.loads(screened_json)["evaluations"]} if screened_json else {}
    full_chain = json.loads(evaluated_json)
    evaluated = {e["target"]: e for e in full_chain["evaluations"]}
    decision = json.loads(decision_json) if decision_json else {"full": [c["name"] for c in search["candidates"]], "dropped": {}, "margin": 0.0}
    budget = search["budget"]
    candidates = []
    for spec in search["candidates"]:
        name = spec["name"]
        full = evaluated.get(name, {}).get("metrics")
        chain = (evaluated.get(name) or screened.get(name) or {}).get("stages", [])
        misses = search_report.violations(full, budget) if full else []
        candidates.append({
            "name": name, "label": spec["label"], "stages": spec["stages"], "chain": chain,
            "screen": (screened.get(name) or {}).get("metrics"), "full": full,
            "meets_budget": bool(full) and not misses,
            "why_not": "; ".join(search_report.describe(v) for v in misses) if full else decision["dropped"].get(name, ""),
        })
    done = [{"name": c["name"], "metrics": c["full"]} for c in candidates if c["full"]]
    verdict = search_report.pick_winner(done, budget, search["objective"])
    base = full_chain["baseline"]["metrics"]
    latency_key = min((k for k in base if k.startswith("decode_ms_per_token.")), key=search_report._batch, default=None)
    by_latency = {c["name"]: (c["metrics"][latency_key], c["metrics"]["perplexity"]) for c in done if latency_key and latency_key in c["metrics"]}
    stage_times = {s["key"]: s["metrics"].get("wall_time_s", 0.0) for c in candidates for s in c["chain"]}
    screen_base = json.loads(screened_json)["baseline"] if screened_json else None
    screen_s = sum(e["metrics"].get("eval_wall_time_s", 0.0) for e in screened.values()) + _wall(screen_base)
    full_s = sum(c["full"].get("eval_wall_time_s", 0.0) for c in candidates if c["full"]) + _wall(full_chain["baseline"])
    return {
        "budget": budget, "objective": search["objective"], "screen": search.get("screen"), "parallelism": search["parallelism"],
        "candidates": candidates, "candidates_by_name": {c["name"]: c for c in candidates}, "decision": decision,
        "front": search_report.pareto({c["name"]: (c["metrics"]["size_bytes"], c["metrics"]["perplexity"]) for c in done}),
        "front_latency": search_report.pareto(by_latency) if by_latency else [], "latency_key": latency_key,
        **verdict,
        "cost": {"screen_s": screen_s, "full_s": full_s, "evaluation_s": screen_s + full_s, "stages_s": sum(stage_times.values())},
    }


def _wall(record: dict[str, Any] | None) -> float:
    return (record or {}).get("metrics", {}).get("eval_wall_time_s", 0.0)


def winner_recipe(search: dict[str, Any], results: dict[str, Any]) -> str | None:
    """The winner as a plain recipe (the search's recipe, its stages the winner's chain):
    ``llmpress run`` reruns it, from the cache where the search ran it."""
    if not results["winner"]:
        return None
    winner = results["candidates_by_name"][results["winner"]]
    # a recipe's usual order: name and model first, the stages after the data
    order = ("name", "description", "model", "teacher", "data", "stages", "evaluation", "tracking", "storage", "image", "cluster")
    plain = {**search["plain_recipe"], "stages": winner["stages"]}
    plain = {key: plain[key] for key in sorted(plain, key=lambda k: order.index(k) if k in order else len(order))}
    note = (f"# The winner of search {search['plain_recipe']['name']!r}: {winner['label']}\n"
            f"# budget: {', '.join(f'{k} {v}' for k, v in search['budget'].items() if v is not None)}; "
            f"perplexity ratio {winner['full']['perplexity_ratio']:.4f}, size ratio {winner['full']['size_bytes_ratio']:.4f}\n")
    return note + yaml.safe_dump(plain, sort_keys=False)


@steps.user_errors_exit
def finish_search(screened_json: str, evaluated_json: str, decision_json: str, search_json: str, recipe_json: str,
                  results_path: str, report_path: str, html_path: str, winner_path: str) -> dict[str, Any]:
    """The search's report step: results.json (every candidate, the front, the winner),
    the report, the winner's recipe; in MLflow one parent run, one nested run per
    candidate (its stages' runs nested under it), the front and the winner's recipe as
    artifacts, the winner registered. Returns the figures for KFP's Metrics."""
    search, recipe = json.loads(search_json), json.loads(recipe_json)
    tracking.use_spool(steps.spool_for(recipe["name"], recipe.get("storage", {}).get("root", "")))
    found = collect(screened_json, evaluated_json, decision_json, search)
    baseline = json.loads(evaluated_json)["baseline"]
    experiment = recipe["tracking"]["experiment"]
    parent = steps.open_parent_run(recipe)
    baseline_run = tracking.start_child(parent, "baseline", {"evaluation": baseline["config"]}, experiment)
    tracking.log_metrics(baseline_run, baseline["metrics"])
    tracking.finish(baseline_run)
    entries = []
    for c in found["candidates"]:
        run_id = tracking.start_child(parent, c["name"], {"chain": c["label"], "stages": c["stages"]}, experiment)
        tracking.log_metrics(run_id, {**{f"screen.{k}": v for k, v in (c["screen"] or {}).items()}, **(c["full"] or {})})
        for stage in c["chain"]:
            tracking.attach(stage["run_id"], run_id, stage["name"])
        tracking.finish(run_id)
        c["run_id"] = run_id
        if c["full"]:
            leaf = c["chain"][-1]
            entries.append({"name": c["name"], "kind": "candidate", "metrics": {**leaf["metrics"], **c["full"]}, "run_id": run_id,
                            "model_uri": leaf["model_uri"]})
    winner_yaml = winner_recipe(search, found)
    found["winner_recipe"] = winner_yaml
    results = {
        "recipe": {"name": recipe["name"], "hash": steps.recipe_hash(recipe)},
        "tracking": {"parent_run_id": parent, "experiment": experiment, "register_as": recipe["tracking"].get("register_as") or recipe["name"]},
        "baseline": {"metrics": baseline["metrics"], "run_id": baseline_run},
        "stages": entries,
        "search": found,
    }
    Path(winner_path).parent.mkdir(parents=True, exist_ok=True)
    Path(winner_path).write_text(winner_yaml or "# nothing meets the budget: " + "; ".join(found["failed"]) + "\n")
    steps.publish_report(results, results_path, report_path, html_path, parent, [])
    if parent:
        tracking.log_metrics(parent, {f"baseline.{k}": v for k, v in baseline["metrics"].items()})
        if found["winner"]:
            winner = found["candidates_by_name"][found["winner"]]
            tracking.log_metrics(parent, {f"final.{k}": v for k, v in winner["full"].items()})
        with tempfile.TemporaryDirectory() as tmp:
            front = Path(tmp) / "front.json"
            front.write_text(json.dumps({k: found[k] for k in ("budget", "front", "front_latency", "winner", "closest", "failed")}, indent=1))
            tracking.log_artifact(parent, front)
        if winner_yaml:
            steps.log_named_artifact(parent, winner_path, "winner.yaml")
        if found["winner"]:
            chosen = next(e for e in entries if e["name"] == found["winner"])
            tracking.register_model(results["tracking"]["register_as"], chosen["model_uri"], parent, chosen["metrics"])
        tracking.finish(parent)
    print(report.table(results), flush=True)
    print(verdict_line(found), flush=True)
    return _figures(found)


def verdict_line(found: dict[str, Any]) -> str:
    """The search's outcome in one line."""
    if found["winner"]:
        return f"winner: {found['winner']} ({found['candidates_by_name'][found['winner']]['label']})"
    return f"nothing meets the budget; closest: {found['closest']}: {'; '.join(found['failed'])}"


def _figures(found: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"candidates": len(found["candidates"]), "fully_evaluated": len(found["decision"]["full"]),
                           "front_size": len(found["front"]), "meets_budget": sum(c["meets_budget"] for c in found["candidates"]),
                           **{f"cost.{k}": v for k, v in found["cost"].items()}}
    if found["winner"]:
        winner = found["candidates_by_name"][found["winner"]]["full"]
        out.update({f"winner.{k}": v for k, v in winner.items() if isinstance(v, int | float) and math.isfinite(v)})
    return out
