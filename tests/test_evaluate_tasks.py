"""Task accuracy through lm-evaluation-harness, offline: the builtin task and a task YAML
with its data in a local file, on the tiny model the evaluation already loaded."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to reach the hub fails: these tasks must run from local files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from llmpress.components.models.io import load_model

    return load_model(tiny_model_dir, dtype="float32")


ITEMS = [
    {"q": "The function returns", "options": ["a value.", "the green elephant.", "None of the"], "answer": 0},
    {"q": "A module is a file containing", "options": ["Python definitions.", "blue", "of of of"], "answer": 0},
    {"q": "The loop runs", "options": ["zebra", "until the condition is false.", "is the"], "answer": 1},
    {"q": "An exception is raised when", "options": ["the the the", "banana split", "an error occurs."], "answer": 2},
    {"q": "The list is sorted", "options": ["in place.", "cloud", "for for"], "answer": 0},
]


def write_task(folder):
    """A harness task YAML whose data file is named relative to the YAML, as a user writes it."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (folder / "mini.yaml").write_text(
        "task: mini_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/items.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{options}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder / "mini.yaml"


def plain_accuracy(model, tokenizer):
    """The same multiple choice scored by hand: the option with the highest summed
    log-likelihood after the question and a space wins."""
    import torch

    right = 0
    for item in ITEMS:
        context = tokenizer(item["q"], add_special_tokens=False)["input_ids"]
        scores = []
        for option in item["options"]:
            whole = tokenizer(item["q"] + " " + option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
    return right / len(ITEMS)


def test_a_local_task_yaml_runs_offline_and_matches_plain_scoring(tiny, tmp_path, monkeypatch):
    from llmpress.components.stages.evaluate.tasks import task_metrics

    model, tokenizer = tiny
    task = write_task(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)  # the data path resolves against the YAML, not the working folder
    figures = task_metrics(model, tokenizer, [str(task)], limit=None, num_fewshot=None, batch_size=4, device="cpu")
    assert figures["task.mini_choice.samples"] == len(ITEMS)
    assert figures["task.mini_choice.acc"] == pytest.approx(plain_accuracy(model, tokenizer))


def test_the_builtin_task_runs_offline_with_a_limit(tiny):
    from llmpress.components.stages.evaluate.tasks import task_metrics

    model, tokenizer = tiny
    figures = task_metrics(model, tokenizer, ["builtin:pydoc-cloze"], limit=12, num_fewshot=0, batch_size=8, device="cpu")
    assert figures["task.pydoc_cloze.samples"] == 12
    assert 0.0 <= figures["task.pydoc_cloze.acc"] <= 1.0 and 0.0 <= figures["task.pydoc_cloze.acc_norm"] <= 1.0
    assert figures["task.pydoc_cloze.acc_stderr"] > 0


def test_the_builtin_task_data_is_what_its_builder_makes():
    import importlib.util

    from llmpress.components.stages.evaluate.tasks import TASKS_DIR

    spec = importlib.util.spec_from_file_location("build_pydoc_cloze", TASKS_DIR / "build_pydoc_cloze.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    shipped = [json.loads(line) for line in (TASKS_DIR / "pydoc_cloze.jsonl").read_text().splitlines()]
    assert shipped == builder.items() and len(shipped) == 100
    assert all(len(i["choices"]) == 4 and i["choices"][i["label"]] for i in shipped)


@pytest.mark.parametrize(
    ("spec", "allowed"),
    [
        ("builtin:nope", "builtin tasks are builtin:pydoc-cloze"),
        ("missing/task.yaml", "task YAML not found"),
        ("s3://bucket/task.yaml", "s3:// task files must be downloaded before the stage runs (component layer)"),
    ],
    ids=["unknown-builtin", "missing-yaml", "s3-not-fetched"],
)
def test_a_task_that_cannot_be_found_is_one_clear_line(tiny, spec, allowed):
    from llmpress.components.errors import UserError
    from llmpress.components.stages.evaluate.tasks import task_metrics

    model, tokenizer = tiny
    with pytest.raises(UserError) as err:
        task_metrics(model, tokenizer, ["builtin:pydoc-cloze", spec], limit=1, num_fewshot=None, batch_size=1, device="cpu", field="stages.acc")
    assert err.value.problems == [f"stages.acc.tasks[1]: {spec!r} — {allowed}"]


@pytest.mark.slow  # indexing the harness's 14,000 task configs takes ~15 s on 2 cores
def test_an_unknown_harness_task_suggests_close_names(tiny):
    from llmpress.components.errors import UserError
    from llmpress.components.stages.evaluate.tasks import task_metrics

    model, tokenizer = tiny
    with pytest.raises(UserError) as err:
        task_metrics(model, tokenizer, ["helaswag"], limit=1, num_fewshot=None, batch_size=1, device="cpu")
    (line,) = err.value.problems
    assert line.startswith("evaluation.tasks[0]: 'helaswag' — not an lm-evaluation-harness task") and "hellaswag" in line
