"""The search block: budget parsing and refusal lines, candidate expansion, the compiled
pipeline's fan-out, parallelism and shared prefixes, and the decisions (front, screening,
winner, nothing meeting the budget). The end-to-end runs are in test_search_run.py."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import yaml
from conftest import run_cli, tiny_recipe
from llmpress.cli import main
from llmpress.components.report import search as search_report
from llmpress.recipe import parse_recipe
from llmpress.search import Budget

SPACE = {
    "prune": ["none", {"method": "magnitude", "sparsity": 0.5}],
    "quantize": [{"scheme": "gptq-w4a16", "grid": {"group_size": [32, 64]}}, {"scheme": "nf4"}],
}


def search_recipe(**search):
    block = {"budget": {"size_ratio": 0.5, "perplexity_ratio": 1.2}, "space": SPACE, **search}
    recipe = tiny_recipe(name="tiny-search", search=block)
    del recipe["stages"]
    return recipe


@pytest.mark.parametrize("text, expected", [("4GB", 4 * 10**9), ("300MiB", 300 * 2**20), ("2.5 GB", 2_500_000_000), (123456, 123456)])
def test_budget_size_takes_bytes_or_a_size_with_units(text, expected):
    assert Budget(size_bytes=text).size_bytes == expected


def budget(**limits):
    return search_recipe(budget=limits)


BROKEN = {  # case id: (recipe, text the single error line must contain)
    "empty-budget": (budget(), "search.budget: {} — a budget needs at least one of size_bytes, size_ratio, perplexity_ratio"),
    "size-without-unit-sense": (budget(size_bytes="4 gigs"), "search.budget.size_bytes: '4 gigs' — a number of bytes or a size such as '4GB'"),
    "size-ratio-above-one": (budget(size_ratio=1.5), "search.budget.size_ratio: 1.5 — Input should be less than or equal to 1"),
    "unknown-budget-key": (budget(memory=3), "search.budget.memory: unknown key — allowed keys: size_bytes, size_ratio, perplexity_ratio"),
    "bad-option-field": (search_recipe(space={"quantize": [{"scheme": "gptq-w4a16", "grid": {"group_size": [32, 100]}}]}),
                         "search.space.quantize[0].group_size: 100 — allowed: 32, 64, 128, 256, or -1"),
    "unknown-option-key": (search_recipe(space={"prune": [{"method": "wanda", "bits": 3}]}), "search.space.prune[0].bits: unknown key — allowed keys:"),
    "kind-in-option": (search_recipe(space={"quantize": [{"kind": "prune", "scheme": "nf4"}]}), "search.space.quantize[0].kind: 'prune' — set by the axis"),
    "grid-not-lists": (search_recipe(space={"quantize": [{"scheme": "gptq-w4a16", "grid": {"group_size": 32}}]}),
                       "search.space.quantize[0].grid: {'group_size': 32} — a mapping of field to a non-empty list of values"),
    "mixed-without-size-ratio": (search_recipe(budget={"perplexity_ratio": 1.1}, space={"mixed_precision": [{"scheme": "nf4"}]}),
                                 "search.space.mixed_precision[0]: mixed_precision — needs search.budget.size_ratio"),
    "empty-space": (search_recipe(space={"prune": ["none"]}), "search.space: no candidate"),
    "too-many-candidates": (search_recipe(max_candidates=3), "search.space: 6 candidates — at most search.max_candidates (3)"),
    "zero-parallelism": (search_recipe(parallelism=0), "search.parallelism: 0 — Input should be greater than or equal to 1"),
    "stages-and-search": ({**search_recipe(), "stages": [{"name": "q", "kind": "quantize", "scheme": "nf4"}]}, "stages: given with a search"),
    "neither-stages-nor-search": ({k: v for k, v in tiny_recipe().items() if k != "stages"},
                                 "stages: missing — required (a list of stages, or a search block)"),
    "unknown-objective": (search_recipe(objective="speed"), "search.objective: 'speed' — Input should be 'perplexity' or 'size'"),
    "unknown-screen-keep": (search_recipe(screen={"windows": 2, "keep": "all"}), "search.screen.keep: 'all' — Input should be 'front' or 'winner'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_search_gets_one_clear_line_and_exit_2(case, write_recipe, capsys):
    recipe, expected = BROKEN[case]
    code = main(["validate", str(write_recipe(copy.deepcopy(recipe)))])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_a_search_recipe_validates(write_recipe, capsys):
    assert main(["validate", str(write_recipe(search_recipe()))]) == 0
    assert capsys.readouterr().out.strip() == "ok"


def test_space_expands_to_every_chain_with_named_shared_stages():
    recipe = parse_recipe(search_recipe())
    found = [(c.name, c.label) for c, _ in recipe.search_candidates()]
    assert found == [
        ("c1", "gptq-w4a16-g32"), ("c2", "gptq-w4a16-g64"), ("c3", "nf4"),
        ("c4", "magnitude-50 → gptq-w4a16-g32"), ("c5", "magnitude-50 → gptq-w4a16-g64"), ("c6", "magnitude-50 → nf4"),
    ]
    _, stages = recipe.search_candidates()[3]
    assert [s.kind for s in stages] == ["prune", "quantize"] and stages[1].group_size == 32


def test_a_grid_over_zero_points_names_each_stage_by_its_setting():
    space = {"quantize": [{"scheme": "gptq-w4a16", "grid": {"group_size": [32], "symmetric": [False, True]}}]}
    recipe = parse_recipe(search_recipe(space=space))
    found = [(c.label, stages[0].symmetric) for c, stages in recipe.search_candidates()]
    assert found == [("gptq-w4a16-g32-asym", False), ("gptq-w4a16-g32-sym", True)]


def test_mixed_precision_options_take_their_bits_from_the_size_budget():
    recipe = parse_recipe(search_recipe(space={"mixed_precision": [{"scheme": "nf4", "fill": [1.0, 0.5]}]}))
    budgets = [stages[0].auto_ignore.budget for _, stages in recipe.search_candidates()]
    assert budgets == [0.5 * 16, 0.25 * 16]


def compiled(write_recipe, tmp_path, recipe):
    out = tmp_path / "search.yaml"
    result = run_cli("compile", str(write_recipe(recipe)), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(out.read_text()))


@pytest.fixture(scope="module")
def search_ir(tmp_path_factory):
    """The compiled IR of the six-candidate search with parallelism 2 and a GPU option."""
    tmp = tmp_path_factory.mktemp("ir")
    space = copy.deepcopy(SPACE)
    space["quantize"][1]["resources"] = {"gpus": 1, "node_selector": {"pool": "l4"}}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(search_recipe(parallelism=2, space=space)))
    out = tmp / "search.yaml"
    result = run_cli("compile", str(path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(out.read_text()))


def tasks(ir, prefix):
    dag = ir[0]["root"]["dag"]["tasks"]
    return {name: task for name, task in dag.items() if name.startswith(prefix)}


def stage_of(task):
    return json.loads(task["inputs"]["parameters"]["stage_json"]["runtimeValue"]["constant"])


def test_compiled_search_runs_a_shared_prefix_once(search_ir):
    stages = tasks(search_ir, "run-stage")
    # 3 quantize options on the base model + 1 prune + 3 quantize options on the pruned model
    assert len(stages) == 7
    pruned = [name for name, t in stages.items() if stage_of(t)["kind"] == "prune"]
    assert len(pruned) == 1
    fed_by_prune = [t for t in stages.values() if t["inputs"]["artifacts"]["model"].get("taskOutputArtifact", {}).get("producerTask") == pruned[0]]
    assert sorted(stage_of(t)["name"] for t in fed_by_prune) == ["gptq-w4a16-g32", "gptq-w4a16-g64", "nf4"]


def test_compiled_search_keeps_at_most_parallelism_model_steps_running(search_ir):
    dag = search_ir[0]["root"]["dag"]["tasks"]
    stages = sorted(tasks(search_ir, "run-stage"))

    def before(name):  # every task this one waits for, directly or not
        seen, todo = set(), list(dag[name].get("dependentTasks", []))
        while todo:
            task = todo.pop()
            if task not in seen:
                seen.add(task)
                todo += dag[task].get("dependentTasks", [])
        return seen

    ordered = {name: before(name) for name in stages}
    # the most model steps that can run at once: the largest set of which none waits for another
    most = max(len(group) for size in range(1, len(stages) + 1) for group in itertools.combinations(stages, size)
               if all(a not in ordered[b] and b not in ordered[a] for a, b in itertools.combinations(group, 2)))
    assert most == 2


def test_searches_name_a_model_step_by_its_chain_so_a_larger_search_reuses_it(write_recipe, tmp_path):
    def step_names(space):
        ir = compiled(write_recipe, tmp_path, search_recipe(space=space))
        return {stage_of(t)["name"]: name for name, t in tasks(ir, "run-stage").items() if stage_of(t)["kind"] == "prune"}, set(tasks(ir, "run-stage"))

    small_prune, small = step_names({"prune": [{"method": "magnitude", "sparsity": 0.5}], "quantize": [{"scheme": "nf4"}]})
    large_prune, large = step_names({"prune": ["none", {"method": "magnitude", "sparsity": 0.5}], "quantize": [{"scheme": "gptq-w4a16"}, {"scheme": "nf4"}]})
    assert small <= large and small_prune == large_prune  # the same chains, at other places in the pipeline


def test_compiled_search_evaluates_each_candidate_twice_and_selects_between(search_ir):
    evals = tasks(search_ir, "evaluate-candidate")
    assert len(evals) == 12  # screening and full evaluation of six candidates
    select = tasks(search_ir, "select-candidates")
    assert len(select) == 1
    gated = [t for t in evals.values() if "taskOutputParameter" in t["inputs"]["parameters"]["decision"]]
    assert len(gated) == 6 and all(t["inputs"]["parameters"]["decision"]["taskOutputParameter"]["producerTask"] in select for t in gated)
    assert len(tasks(search_ir, "finish-search")) == 1


def test_compiled_search_puts_each_option_on_its_own_node_pool(search_ir):
    executors = search_ir[0]["deploymentSpec"]["executors"]
    platform = search_ir[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    nf4 = [name for name, t in tasks(search_ir, "run-stage").items() if stage_of(t)["name"] == "nf4"]
    assert len(nf4) == 2
    for name in nf4:
        executor = search_ir[0]["root"]["dag"]["tasks"][name]["componentRef"]["name"].replace("comp-", "exec-")
        assert executors[executor]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
        assert platform[executor]["nodeSelector"]["labels"] == {"pool": "l4"}


def test_without_screening_every_candidate_is_evaluated_once(write_recipe, tmp_path):
    ir = compiled(write_recipe, tmp_path, search_recipe(screen=None))
    assert len(tasks(ir, "evaluate-candidate")) == 6
    assert tasks(ir, "select-candidates") == {}


def test_screening_windows_do_not_overlap_even_when_the_full_evaluation_strides(write_recipe, tmp_path):
    recipe = search_recipe()
    recipe["evaluation"] = {**recipe.get("evaluation", {}), "stride": 16}
    ir = compiled(write_recipe, tmp_path, recipe)

    def strides(names):
        return {json.loads(t["inputs"]["parameters"]["config_json"]["runtimeValue"]["constant"])["stride"] for t in names.values()}

    evals = tasks(ir, "evaluate-candidate")
    screened = {n: t for n, t in evals.items() if "taskOutputParameter" not in t["inputs"]["parameters"]["decision"]}
    full = {n: t for n, t in evals.items() if n not in screened}
    assert strides(screened) == {None} and strides(full) == {16}


def test_screening_leaves_out_the_sparsity_count_the_full_evaluation_makes(write_recipe, tmp_path):
    ir = compiled(write_recipe, tmp_path, search_recipe())

    def counts(names):
        return {json.loads(t["inputs"]["parameters"]["config_json"]["runtimeValue"]["constant"])["count_sparsity"] for t in names.values()}

    evals = tasks(ir, "evaluate-candidate")
    screened = {n: t for n, t in evals.items() if "taskOutputParameter" not in t["inputs"]["parameters"]["decision"]}
    full = {n: t for n, t in evals.items() if n not in screened}
    assert counts(screened) == {False} and counts(full) == {True}


def model_steps(ir):
    """Each model step: (its component's container, its inputs with pipeline parameters
    resolved to their defaults), by step name: what kfp.local's cache key is made of."""
    defaults = {k: v.get("defaultValue") for k, v in ir[0]["root"].get("inputDefinitions", {}).get("parameters", {}).items()}
    executors = ir[0]["deploymentSpec"]["executors"]

    def value(spec):
        return defaults[spec["componentInputParameter"]] if "componentInputParameter" in spec else spec.get("runtimeValue", {}).get("constant", spec)

    return {name: (executors[t["componentRef"]["name"].replace("comp-", "exec-")]["container"],
                   {k: value(v) for k, v in t["inputs"]["parameters"].items()}, t["inputs"]["artifacts"])
            for name, t in tasks(ir, "run-stage").items()}


def test_the_winners_recipe_makes_its_models_with_the_searchs_steps(write_recipe, tmp_path):
    from llmpress.components.kubeflow import search_steps
    from llmpress.search_pipeline import search_json

    recipe = search_recipe()
    search = json.loads(search_json(parse_recipe(copy.deepcopy(recipe))))
    chosen = next(c for c in search["candidates"] if c["label"] == "magnitude-50 → gptq-w4a16-g32")
    found = {"winner": chosen["name"], "candidates_by_name": {chosen["name"]: {**chosen, "full": {"perplexity_ratio": 1.0, "size_bytes_ratio": 0.4}}}}
    winner = yaml.safe_load(search_steps.winner_recipe(search, found))
    searched, plain = model_steps(compiled(write_recipe, tmp_path, recipe)), model_steps(compiled(write_recipe, tmp_path, winner))
    assert len(plain) == 2
    for name, step in plain.items():  # the same component name, container and inputs: the same cache key
        assert searched[name] == step, name


# --- the decisions ---------------------------------------------------------------------

def candidate(name, size, ppl, size_ratio=None, ppl_ratio=None, **more):
    return {"name": name, "metrics": {"size_bytes": size, "perplexity": ppl, "size_bytes_ratio": size_ratio or size / 100,
                                      "perplexity_ratio": ppl_ratio or ppl / 10, **more}}


def test_pareto_front_keeps_what_nothing_beats_on_size_and_perplexity():
    points = {"a": (40, 11.0), "b": (50, 10.5), "c": (50, 12.0), "d": (30, 13.0), "e": (60, 10.5)}
    assert search_report.pareto(points) == ["d", "a", "b"]


def test_screening_keeps_candidates_within_the_margin_of_the_front():
    screened = [candidate("a", 40, 11.0), candidate("b", 40, 11.3), candidate("c", 45, 12.0)]
    decision = search_report.screen_decision(screened, {"size_ratio": 0.5}, margin=0.05)
    assert decision["full"] == ["a", "b"]  # b is 2.7% worse: still possibly on the front
    assert "dominated" in decision["dropped"]["c"]


def test_screening_keeps_every_feasible_candidate_when_the_budget_limits_speed():
    screened = [candidate("a", 40, 11.0), candidate("c", 45, 12.0), candidate("big", 90, 12.5)]
    decision = search_report.screen_decision(screened, {"size_ratio": 0.5, "latency_ratio": 1.0}, margin=0.05)
    assert decision["full"] == ["a", "c"]
    assert "size_ratio 0.9 > 0.5" in decision["dropped"]["big"]


def test_screening_for_the_winner_only_keeps_what_could_still_win():
    # the smallest (d) is on the front but over the perplexity limit; b is within 5% of a
    screened = [candidate("a", 40, 11.0), candidate("b", 38, 11.3), candidate("c", 39, 12.0), candidate("d", 30, 13.5)]
    budget = {"size_ratio": 0.5, "perplexity_ratio": 1.25}
    assert search_report.screen_decision(screened, budget, margin=0.05)["full"] == ["a", "b", "d"]
    decision = search_report.screen_decision(screened, budget, margin=0.05, keep="winner")
    assert decision["full"] == ["a", "b"]
    assert decision["dropped"] == {"c": "beaten on perplexity by more than 5% at screening",
                                   "d": "perplexity_ratio 1.35 > 1.25 (8.0% over)"}


def test_screening_for_the_smallest_winner_keeps_smaller_candidates_that_may_miss_the_limit():
    # d is the smallest but may miss the limit (within the margin): a, which surely meets it, goes on too; b is larger than a
    screened = [candidate("a", 40, 11.0), candidate("b", 45, 10.5), candidate("d", 30, 12.8)]
    decision = search_report.screen_decision(screened, {"perplexity_ratio": 1.25}, margin=0.05, keep="winner", objective="size")
    assert decision["full"] == ["a", "d"]
    assert "beaten on size" in decision["dropped"]["b"]


def test_winner_is_the_best_candidate_meeting_every_constraint():
    evaluated = [candidate("small", 30, 13.0), candidate("good", 45, 10.5), candidate("big", 80, 10.1)]
    assert search_report.pick_winner(evaluated, {"size_ratio": 0.5}, "perplexity")["winner"] == "good"
    assert search_report.pick_winner(evaluated, {"perplexity_ratio": 1.1}, "size")["winner"] == "good"


def test_nothing_meeting_the_budget_names_the_constraint_and_the_miss():
    evaluated = [candidate("a", 60, 11.0), candidate("b", 45, 13.0)]
    verdict = search_report.pick_winner(evaluated, {"size_ratio": 0.5, "perplexity_ratio": 1.2}, "perplexity")
    # b misses perplexity by 8.3%, a misses size by 20%: b is the closer
    assert verdict["winner"] is None and verdict["closest"] == "b"
    assert verdict["failed"] == ["perplexity_ratio 1.3 > 1.2 (8.3% over)"]


def test_a_constraint_the_evaluation_did_not_measure_is_not_met():
    misses = search_report.violations({"size_bytes": 10, "perplexity_ratio": 1.0}, {"accuracy_recovery": 0.98})
    assert misses[0]["value"] is None
    assert "not measured" in search_report.describe(misses[0])


def test_speed_and_accuracy_constraints_read_the_matching_figures():
    metrics = {"decode_ms_per_token.b1.in128.out32_ratio": 0.8, "decode_ms_per_token.b8.in128.out32_ratio": 0.9,
               "throughput_tok_s.b1.in128.out32_ratio": 1.1, "throughput_tok_s.b8.in128.out32_ratio": 1.3,
               "task.pydoc_cloze.acc_ratio": 0.97, "task.other.acc_ratio": 0.99}
    assert search_report.constraint_value(metrics, "latency_ratio") == 0.8
    assert search_report.constraint_value(metrics, "throughput_ratio") == 1.3
    assert search_report.constraint_value(metrics, "accuracy_recovery") == 0.97


def chain_of(evaluations, baseline_ppl=10.0):
    base = {"size_bytes": 100, "perplexity": baseline_ppl, "eval_wall_time_s": 2.0, "decode_ms_per_token.b1.in8.out4": 5.0}
    return json.dumps({"baseline": {"target": "baseline", "metrics": base, "config": {}}, "evaluations": evaluations})


def record(name, size, ppl, stage_key):
    metrics = {"size_bytes": size, "perplexity": ppl, "size_bytes_ratio": size / 100, "perplexity_ratio": ppl / 10, "eval_wall_time_s": 1.0,
               "decode_ms_per_token.b1.in8.out4": 4.0}
    stages = [{"name": f"s-{name}", "kind": "quantize", "metrics": {"wall_time_s": 3.0}, "run_id": None, "model_uri": f"/m/{name}", "key": stage_key}]
    return {"target": name, "metrics": metrics, "stages": stages}


def test_collected_results_hold_the_verdict_front_cost_and_a_report_section(tmp_path):
    from llmpress.components import report
    from llmpress.components.kubeflow import search_steps

    specs = [{"name": n, "label": f"s-{n}", "stages": [{"name": f"s-{n}", "kind": "quantize", "scheme": "nf4"}]} for n in ("c1", "c2", "c3")]
    search = {"budget": {"size_ratio": 0.5}, "objective": "perplexity", "parallelism": 2, "screen": {"windows": 2, "margin": 0.05},
              "candidates": specs, "plain_recipe": {"name": "s", "model": {"source": "x"}}}
    screened = chain_of([record("c1", 40, 11.0, "k1"), record("c2", 45, 12.5, "k2"), record("c3", 60, 10.2, "k3")])
    decision = search_steps.select_candidates(screened, json.dumps(search))
    assert json.loads(decision)["full"] == ["c1", "c3"]
    skipped = {"target": "c2", "skipped": "dominated", "stages": record("c2", 45, 12.5, "k2")["stages"]}
    evaluated = chain_of([record("c1", 40, 11.1, "k1"), skipped, record("c3", 60, 10.3, "k3")])
    found = search_steps.collect(screened, evaluated, decision, search)
    assert found["winner"] == "c1" and found["front"] == ["c1", "c3"]
    assert found["candidates_by_name"]["c2"]["full"] is None and found["candidates_by_name"]["c3"]["why_not"].startswith("size_ratio 0.6 > 0.5")
    assert found["cost"] == {"screen_s": 5.0, "full_s": 4.0, "evaluation_s": 9.0, "stages_s": 9.0}
    plain = yaml.safe_load(search_steps.winner_recipe(search, found))
    assert list(plain) == ["name", "model", "stages"] and plain["stages"][0]["name"] == "s-c1"
    results = {"recipe": {"name": "s"}, "baseline": {"metrics": json.loads(evaluated)["baseline"]["metrics"]},
               "stages": [{"name": "c1", "kind": "candidate", "metrics": found["candidates_by_name"]["c1"]["full"]}], "search": found}
    paths = report.write_report(results, tmp_path, [])
    assert "**Winner: `c1`**" in paths["markdown"].read_text() and "<h2>Search</h2>" in paths["html"].read_text()
    assert paths["front"].stat().st_size > 10_000


def test_cluster_defaults_give_search_options_their_kinds_resources():
    from llmpress.cluster import with_defaults

    defaults = {"resources": {"quantize": {"gpus": 1}, "prune": {"gpus": 2}}}
    space = copy.deepcopy(SPACE)
    space["quantize"][1]["resources"] = {"gpus": 4}
    out = with_defaults(search_recipe(space=space), defaults)["search"]["space"]
    assert out["prune"][0] == "none" and out["prune"][1]["resources"] == {"gpus": 2}
    assert [o["resources"] for o in out["quantize"]] == [{"gpus": 1}, {"gpus": 4}]  # a set block is kept whole
