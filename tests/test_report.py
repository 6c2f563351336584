"""The run report: every stage in the table, Markdown and HTML; the quality-against-size
plot is a real PNG and shows earlier runs of the experiment; `llmpress report` takes a
run folder or an MLflow run id."""

from __future__ import annotations

import json

import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stage_metrics(size: float, ppl: float, acc: float, tok_s: float, base: dict | None = None) -> dict:
    m = {
        "eval_device": "cpu: x86_64, 2 threads", "size_bytes": size, "num_parameters": 3_670_000, "bits_per_parameter": 8 * size / 3_670_000,
        "sparsity": 0.0, "perplexity": ppl, "eval_tokens": 4000, "eval_windows": 16, "eval_seq_len": 256, "eval_stride": 256,
        "task.pydoc_cloze.acc": acc,
        "task.pydoc_cloze.acc_stderr": 0.05, "task.pydoc_cloze.samples": 100, "ttft_ms.b1.in128": 4.0, "throughput_tok_s.b8.in128.out32": tok_s,
        "eval_peak_memory_bytes": 7e8, "eval_peak_memory_kind": "process peak RSS", "generation_sample": "The following example shows how to\nuse it",
    }
    if base:
        skip = ("eval_tokens", "task.pydoc_cloze.acc_stderr")
        m.update({f"{k}_ratio": v / base[k] for k, v in m.items() if isinstance(v, float | int) and base.get(k) and k not in skip})
    return m


@pytest.fixture
def results() -> dict:
    base = stage_metrics(7.35e6, 128.3, 0.41, 900.0)
    return {
        "recipe": {"name": "demo-gptq", "hash": "abc"},
        "tracking": {"parent_run_id": None, "experiment": "tests"},
        "baseline": {"metrics": base, "run_id": None},
        "stages": [
            {"name": "prune-50", "kind": "prune", "metrics": {**stage_metrics(7.35e6, 140.2, 0.37, 880.0, base), "sparsity": 0.5, "wall_time_s": 12.0}},
            {"name": "gptq", "kind": "quantize", "metrics": {**stage_metrics(2.69e6, 141.0, 0.36, 700.0, base), "wall_time_s": 10.0}},
        ],
    }


def test_the_table_has_a_row_per_stage_and_the_figures_this_run_has(results):
    from llmpress.components import report

    lines = report.table(results).splitlines()
    assert lines[0].split()[:2] == ["stage", "kind"] and "sparsity" in lines[0] and "pydoc_cloze acc" in lines[0]
    assert "tok/s b8.in128.out32" in lines[0] and lines[0].split()[-2:] == ["wall", "s"]
    assert [line.split()[0] for line in lines[2:]] == ["baseline", "prune-50", "gptq"]
    assert "0.366" in lines[4]  # gptq's size ratio


def test_markdown_has_a_table_per_stage_with_baseline_and_ratio(results):
    from llmpress.components import report

    text = report.markdown(results, plot="quality_vs_size.png")
    for heading in ("## baseline (baseline)", "## prune-50 (prune)", "## gptq (quantize)"):
        assert text.count(heading) == 1
    assert text.count("| gptq | quantize |") == 1  # one summary row; per-stage tables do not repeat it
    assert "| quality | task.pydoc_cloze.acc | 0.360 ± 0.050 | 0.410 ± 0.050 | 87.8 % |" in text  # accuracy recovery
    assert "| speed | throughput_tok_s.b8.in128.out32 | 700.00 | 900.00 | 77.8 % |" in text
    assert "measured on cpu: x86_64, 2 threads" in text and "b = batch, in = prompt tokens" in text
    assert "![quality against size](quality_vs_size.png)" in text and "> use it" in text


def test_a_stage_whose_latency_was_skipped_says_why_under_its_heading(results):
    from llmpress.components import report

    reason = "the model's 131.4 GiB of weights and 3.6 GiB of headroom for a forward pass exceed the 80.0 GiB free on cuda"
    results["stages"][0]["metrics"]["latency_skipped"] = reason
    text = report.markdown(results)
    section = text[text.index("## prune-50 (prune)"):text.index("## gptq (quantize)")]
    assert f"forward latency not measured: {reason}" in section
    assert "latency not measured" not in text.replace(section, "")


def test_a_stage_checked_on_the_cpu_says_why_under_its_heading(results):
    from llmpress.components import report

    reason = "the model's 131.4 GiB of weights and 3.6 GiB of headroom for a forward pass exceed the 78.2 GiB free on cuda"
    results["stages"][1]["metrics"]["self_check_on_cpu"] = reason
    text = report.markdown(results)
    section = text[text.index("## gptq (quantize)"):]
    assert f"self-check on the CPU: {reason}" in section
    assert "self-check on the CPU" not in text.replace(section, "")


def test_write_report_makes_markdown_html_and_a_valid_png(results, tmp_path):
    import matplotlib.image
    from llmpress.components import report

    paths = report.write_report(results, tmp_path / "out", earlier=[])
    png = paths["plot"].read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    pixels = matplotlib.image.imread(paths["plot"])
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 1000  # two panels: perplexity and accuracy
    assert pixels.std() > 0.01  # something was drawn
    page = paths["html"].read_text()
    assert page.count("<h2>") == 3 and all(f"<h2>{n} " in page for n in ("baseline", "prune-50", "gptq"))
    assert "src='data:image/png;base64," in page  # self-contained: KFP and MLflow show it as is
    assert paths["markdown"].read_text().startswith("# demo-gptq")


def test_pareto_front_keeps_only_points_nothing_beats():
    from llmpress.components.report.plot import pareto_front

    points = [(7.0, 128.0), (2.7, 141.0), (7.0, 140.0), (3.0, 150.0), (1.0, 400.0)]
    assert pareto_front(points, higher_is_better=False) == [(1.0, 400.0), (2.7, 141.0), (7.0, 128.0)]
    assert pareto_front([(7.0, 0.4), (2.7, 0.36), (3.0, 0.3)], higher_is_better=True) == [(2.7, 0.36), (7.0, 0.4)]


@pytest.fixture
def mlflow_with_an_earlier_run(tmp_path, monkeypatch, results):
    """A sqlite MLflow where one earlier pipeline run of the experiment logged its stages,
    and this run's parent holds its results.json (what the finish step logs)."""
    from llmpress.components import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    earlier = tracking.start_parent("tests", "demo-gptq", params={}, tags={})
    for name, size, ppl in (("baseline", 7.35e6, 130.0), ("awq", 2.7e6, 135.0)):
        child = tracking.start_child(earlier, name, {})
        tracking.log_metrics(child, {"size_bytes": size, "perplexity": ppl})
    parent = tracking.start_parent("tests", "demo-gptq", params={}, tags={})
    results["tracking"]["parent_run_id"] = parent
    (tmp_path / "results.json").write_text(json.dumps(results))
    tracking.log_artifact(parent, tmp_path / "results.json")
    return parent


def test_the_plot_shows_earlier_runs_of_the_experiment(results, tmp_path, mlflow_with_an_earlier_run):
    from llmpress.components import report

    earlier = report.earlier_points(results)
    assert sorted((p["stage"], p["metrics"]["perplexity"]) for p in earlier) == [("awq", 135.0), ("baseline", 130.0)]
    paths = report.write_report(results, tmp_path / "out")
    assert "with 2 stages of 1 earlier runs of experiment 'tests' in grey" in paths["markdown"].read_text()


def test_report_command_takes_a_run_folder(results, tmp_path, capsys):
    from llmpress.cli import main

    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prune-50" in out and "gptq" in out
    for name in ("report.md", "report.html", "quality_vs_size.png"):
        assert (tmp_path / name).is_file()


def test_report_command_takes_an_mlflow_run_id(tmp_path, capsys, mlflow_with_an_earlier_run):
    from llmpress.cli import main

    out_dir = tmp_path / "fetched"
    assert main(["report", mlflow_with_an_earlier_run, "--out", str(out_dir)]) == 0
    assert "gptq" in capsys.readouterr().out
    assert (out_dir / "quality_vs_size.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "## gptq (quantize)" in (out_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("arg", "env", "line"),
    [
        ("no/such/run", {}, "run_dir: 'no/such/run' — no results.json there; pass the folder of a finished llmpress run or an MLflow run id (32 hex digits)"),
        ("0" * 32, {"MLFLOW_TRACKING_URI": ""}, f"run_dir: '{'0' * 32}' — an MLflow run id is looked up in MLFLOW_TRACKING_URI, which is not set"),
    ],
    ids=["not-a-folder", "run-id-without-tracking"],
)
def test_report_command_refuses_what_it_cannot_find_in_one_line(arg, env, line, monkeypatch, capsys):
    from llmpress.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["report", arg]) == 2
    assert capsys.readouterr().err.strip() == f"llmpress: error: {line}"
