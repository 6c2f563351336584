"""The recipe loader against hostile files (pipelines/untrusted_yaml.py): every input up to
the size limit ends in a Recipe or in one line per problem, exit 2, well under a second;
nothing converts a value the user did not write as that type."""

from __future__ import annotations

import time

import pytest
import yaml
from conftest import run_cli, tiny_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmpress import untrusted_yaml
from llmpress.components.errors import UserError
from llmpress.recipe import load_recipe

FAST = 1.0  # CPU seconds: what "well under a second" must stay under; CPU time, not wall time, so that a
# machine busy with other work (CI runners, several test suites at once) does not count against the loader


def alias_bomb(levels: int = 9) -> str:
    """A billion-laughs document: ~1 KB of text, 9**levels values once expanded."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def refused(write_recipe, text: str) -> tuple[str, float]:
    """The one line load_recipe answers, and how long it took."""
    path = write_recipe(text)
    start = time.process_time()
    with pytest.raises(UserError) as err:
        load_recipe(path)
    seconds = time.process_time() - start
    (line,) = err.value.problems
    assert line.startswith(f"recipe: {str(path)!r} — ")
    return line, seconds


def test_an_alias_bomb_is_refused_at_once(write_recipe):
    line, seconds = refused(write_recipe, alias_bomb())
    assert len(alias_bomb()) < 1500 and "more than 10000 values (aliases counted expanded)" in line and seconds < FAST


def test_a_thousand_nested_levels_are_one_line_not_a_recursion_error(write_recipe):
    line, seconds = refused(write_recipe, "name: x\nmodel: " + "[" * 1000 + "]" * 1000 + "\n")
    assert "nest" in line and "depth" in line or "deeper" in line  # libyaml's own limit (1000) or ours, whichever is met first
    assert seconds < FAST


def test_deep_block_mappings_are_refused_too(write_recipe):
    text = "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v\n"
    line, seconds = refused(write_recipe, text)
    assert "nested deeper than 32 levels" in line and seconds < FAST


def test_an_alias_that_would_nest_too_deep_is_refused(write_recipe):
    text = "a: &a " + "[" * 20 + "]" * 20 + "\nb: " + "[" * 20 + "*a" + "]" * 20 + "\n"
    assert "nested deeper than 32 levels" in refused(write_recipe, text)[0]


def test_a_recipe_over_the_size_limit_is_refused_before_it_is_parsed(write_recipe):
    text = "name: x\ndescription: '" + "x" * 27_000_000 + "'\n"  # the 27 MB of the issue
    line, seconds = refused(write_recipe, text)
    assert "more than the 262144 a recipe may have" in line and seconds < FAST


def test_the_largest_recipe_under_the_limits_is_answered_well_under_a_second(write_recipe):
    entries = "".join(f"  key{i:05d}: value{i:05d}\n" for i in range(untrusted_yaml.MAX_NODES // 2 - 10))
    path = write_recipe("name: big\nmodel:\n" + entries)
    assert path.stat().st_size < untrusted_yaml.MAX_BYTES
    start = time.process_time()
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert time.process_time() - start < FAST
    assert len(err.value.problems) == 21 and err.value.problems[-1].startswith("recipe: ... and ")


def test_a_key_given_twice_is_refused_with_its_line(write_recipe):
    line, _ = refused(write_recipe, "name: first\nmodel: {source: builtin:pydoc-llama-tiny}\nname: second\n")
    assert line.endswith("not valid YAML at line 3, column 1: key 'name' is given twice")


def test_a_duplicate_key_inside_a_stage_is_refused(write_recipe):
    text = yaml.safe_dump(tiny_recipe(), sort_keys=False) + "stages:\n  - {name: a, kind: prune, kind: quantize}\n"
    assert "is given twice" in refused(write_recipe, text)[0]


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("gpus", True, "stages[0].resources.gpus: True — Input should be a valid integer"),
    ("gpus", "2", "stages[0].resources.gpus: '2' — Input should be a valid integer"),
    ("gpus", 1.0, "stages[0].resources.gpus: 1.0 — Input should be a valid integer"),
])
def test_a_value_of_the_wrong_type_is_refused_not_converted(write_recipe, field, value, expected):
    recipe = tiny_recipe(stages=[{"name": "q", "kind": "quantize", "scheme": "int8", "resources": {field: value}}])
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(recipe))
    assert err.value.problems == [expected]


def test_a_stage_flag_given_as_a_string_is_refused(write_recipe):
    recipe = tiny_recipe(evaluation={"after_each_stage": "yes please"})
    with pytest.raises(UserError, match=r"evaluation.after_each_stage: 'yes please' — Input should be a valid boolean"):
        load_recipe(write_recipe(recipe))


def test_anchors_for_a_repeated_node_selector_still_work(write_recipe):
    recipe = tiny_recipe(stages=[{"name": "a", "kind": "evaluate", "resources": {"node_selector": {"pool": "h100"}}},
                                 {"name": "b", "kind": "evaluate", "resources": {"node_selector": {"pool": "h100"}}}])
    text = yaml.safe_dump(recipe, sort_keys=False).replace("node_selector:\n      pool: h100", "node_selector: &pool {pool: h100}", 1)
    text = text.replace("node_selector:\n      pool: h100", "node_selector: *pool")
    assert "&pool" in text and "*pool" in text
    assert [s.resources.node_selector for s in load_recipe(write_recipe(text)).stages] == [{"pool": "h100"}] * 2


def test_exponent_floats_are_numbers_as_in_yaml_1_2():
    assert untrusted_yaml.loads("lr: 1e-4\nsteps: 5E3\nname: 1e\n", "r") == {"lr": 0.0001, "steps": 5000.0, "name": "1e"}


def test_more_than_one_document_is_refused(write_recipe):
    assert "more than one YAML document" in refused(write_recipe, "name: a\n---\nname: b\n")[0]


def test_hostile_recipes_exit_2_with_one_line_on_the_command_line(write_recipe, tmp_path):
    for text in (alias_bomb(), "[" * 1000 + "]" * 1000, "a: 1\na: 2\n"):
        result = run_cli("compile", str(write_recipe(text)), "-o", str(tmp_path / "out.yaml"))
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


# --- properties: thousands of generated inputs, none ends in a traceback -------------

YAML_PIECES = st.sampled_from(["name: ", "model: ", "stages:", "\n", "  ", "- ", "{", "}", "[", "]", ",", ":", "&a ", "*a", "&b ", "*b",
                               "kind: quantize", "kind: prune", "gpus: ", "true", "1e-4", "'", '"', "!!str ", "!!binary ", "? ", "---",
                               "#", "|", ">", "%YAML 1.1", "\t", "~", "null", "0x1f", "1_000", "\\u0000", "é", "2001-13-45", "<<: *a"])


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(YAML_PIECES, max_size=40).map("".join) | st.text(max_size=200))
def test_any_text_is_loaded_or_refused_with_user_errors(text):
    start = time.process_time()
    try:
        data = untrusted_yaml.loads(text, "recipe: 'fuzz'")
    except UserError as err:
        assert all("\n" not in p for p in err.problems) and err.problems
        return
    from llmpress.recipe import parse_recipe

    try:
        parse_recipe(data)
    except UserError as err:
        assert err.problems and all(p for p in err.problems)
    assert time.process_time() - start < FAST


RECIPE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
    | st.sampled_from(["quantize", "prune", "distill", "evaluate", "builtin:pydoc-llama-tiny", "s3://b/m", "./m", "../m"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "kind", "model", "source", "stages", "resources", "gpus", "scheme", "data", "tracking", "storage", "x"]) | st.text(max_size=8),
        inner, max_size=5),
    max_leaves=30)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"name": RECIPE_VALUES, "model": RECIPE_VALUES, "stages": RECIPE_VALUES}, optional={"data": RECIPE_VALUES, "x": RECIPE_VALUES}))
def test_any_structure_is_a_recipe_or_one_line_per_problem(tmp_path_factory, data):
    from llmpress.recipe import parse_recipe

    try:
        parse_recipe(data, base_dir=tmp_path_factory.getbasetemp())
    except UserError as err:
        assert err.problems and all(p and "\n" not in p for p in err.problems) and len(err.problems) <= 21


def test_a_long_path_in_a_problem_keeps_its_folder_and_its_file_name():
    path = "/tmp/" + "deep/" * 30 + "model.gguf"  # 165 characters: shown whole
    assert UserError.field("model.source", path, "no such file").problems == [f"model.source: {path!r} — no such file"]
    huge = "/x" * 5_000_000 + "/model.gguf"  # 10 MB from a hostile recipe: one bounded line, both ends kept
    (line,) = UserError.field("model.source", huge, "no such file").problems
    assert len(line) < 300 and line.startswith("model.source: '/x/x") and line.endswith("/model.gguf' — no such file")
