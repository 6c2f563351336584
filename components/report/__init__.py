"""The run report: a results table for the terminal, Markdown and HTML for files and UIs,
and the quality-against-size plot (``report_plot``).

``results`` is ``{"baseline": {"metrics": {...}}, "stages": [{"name", "kind", "metrics"}]}``
(plus ``recipe`` and ``tracking``). ``write_report`` writes everything into one folder;
the Markdown and HTML hold a summary table, then one table per stage with every figure
beside the baseline's and their ratio.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLUMNS = ("stage", "kind", "size MB", "params M", "perplexity", "ppl ratio", "size ratio")
PLOT_NAME = "quality_vs_size.png"
# Per-stage tables group figures by what a user compares; the key's start decides.
SECTIONS = (
    ("quality", ("perplexity", "task.")),
    ("cost", ("size_bytes", "num_parameters", "bits_per_parameter", "sparsity", "eval_peak_memory_bytes")),
    ("speed", ("ttft_ms.", "decode_ms_per_token.", "throughput_tok_s.")),
)
LABELS = ("eval_device", "eval_peak_memory_kind", "generation_sample", "eval_tokens", "eval_windows", "eval_seq_len", "eval_stride", "sparsity_counted_weights")


def entries(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, kind, metrics): the baseline first, then every stage in order."""
    return [("baseline", "baseline", results["baseline"]["metrics"])] + [(s["name"], s["kind"], s["metrics"]) for s in results["stages"]]


def summary_columns(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(header, metric key) of the summary table: the fixed figures, then the ones this run has."""
    cols = [("size MB", "size_bytes"), ("params M", "num_parameters"), ("perplexity", "perplexity")]
    cols += [("ppl ratio", "perplexity_ratio"), ("size ratio", "size_bytes_ratio")]
    all_metrics = [m for _, _, m in entries(results)]
    if any((m.get("sparsity") or 0) > 0.001 for m in all_metrics):
        cols.insert(2, ("sparsity", "sparsity"))
    base = results["baseline"]["metrics"]
    for key in sorted(k for k in base if k.startswith("task.") and k.endswith((".acc", ".exact_match"))):
        cols.append((f"{key.split('.')[1]} {key.split('.')[-1]}", key))
    speed = sorted((k for k in base if k.startswith("throughput_tok_s.")), key=lambda k: int(k.split(".b")[1].split(".")[0]))
    if speed:  # the largest batch: what a server sees
        cols.append((f"tok/s {speed[-1].removeprefix('throughput_tok_s.')}", speed[-1]))
    return cols


def rows(results: dict[str, Any]) -> list[list[str]]:
    """One row for the baseline, then one per stage, formatted for reading."""
    cols = summary_columns(results)
    out = []
    for name, kind, m in entries(results):
        wall = m.get("wall_time_s", m.get("eval_wall_time_s"))
        out.append([name, kind, *(fmt(key, m.get(key)) for _, key in cols), "—" if wall is None else f"{wall:.1f}"])
    return out


def headers(results: dict[str, Any]) -> list[str]:
    return ["stage", "kind", *(h for h, _ in summary_columns(results)), "wall s"]


def fmt(key: str, value: Any) -> str:
    """A figure for reading: MB for bytes, millions for parameters, 3 digits for ratios."""
    if value is None:
        return "—"
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    if key.endswith("_ratio"):
        return f"{value:.3f}"
    if key.endswith("_bytes"):
        return f"{value / 1e6:.2f}"
    if key == "num_parameters":
        return f"{value / 1e6:.2f}"
    if key == "sparsity" or key.startswith("task."):
        return f"{value:.3f}" if not key.endswith(".samples") else str(int(value))
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def table(results: dict[str, Any]) -> str:
    """A plain-text table, columns aligned."""
    body = [headers(results)] + rows(results)
    widths = [max(len(r[i]) for r in body) for i in range(len(body[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stage_table(metrics: dict[str, Any], baseline: dict[str, Any], is_baseline: bool) -> list[tuple[str, str, str, str, str]]:
    """(section, metric, value, baseline value, ratio %) for every figure of one stage."""
    out = []
    numeric = {
        k: v for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not k.endswith(("_ratio", "_stderr")) and k not in LABELS
    }
    placed: set[str] = set()
    for section, starts in (*SECTIONS, ("stage", ("",))):
        for key in sorted(k for k in numeric if k.startswith(starts) and k not in placed):
            placed.add(key)
            ratio = metrics.get(f"{key}_ratio")
            versus = "" if is_baseline else _with_error(key, baseline)
            out.append((section, _unit(key), _with_error(key, metrics), versus, "" if ratio is None else f"{100 * ratio:.1f} %"))
    return out


def _with_error(key: str, metrics: dict[str, Any]) -> str:
    """The figure, with the harness's standard error when it gives one: '0.240 ± 0.043'."""
    error = metrics.get(f"{key}_stderr")
    return fmt(key, metrics.get(key)) + (f" ± {error:.3f}" if isinstance(error, float) else "")


def _unit(key: str) -> str:
    return f"{key} (MB)" if key.endswith("_bytes") else f"{key} (M)" if key == "num_parameters" else key


def caption(metrics: dict[str, Any]) -> str:
    """Where and how the figures were measured."""
    parts = []
    if "eval_device" in metrics:
        parts.append(f"measured on {metrics['eval_device']}")
    if "eval_tokens" in metrics:
        m = {k: metrics.get(k, "?") for k in ("eval_tokens", "eval_windows", "eval_seq_len", "eval_stride")}
        parts.append(f"perplexity over {m['eval_tokens']} tokens in {m['eval_windows']} windows of {m['eval_seq_len']} starting every {m['eval_stride']}")
    if "eval_peak_memory_kind" in metrics:
        parts.append(f"peak memory is the {metrics['eval_peak_memory_kind']} over the whole evaluation")
    if any(k.startswith("ttft_ms.") for k in metrics):
        parts.append("speed keys name their shapes: b = batch, in = prompt tokens, out = generated tokens")
    if "latency_skipped" in metrics:  # a prune stage whose model did not fit its device
        parts.append(f"forward latency not measured: {metrics['latency_skipped']}")
    if "self_check_on_cpu" in metrics:  # a quantize stage whose 16-bit reload did not fit its device
        parts.append(f"self-check on the CPU: {metrics['self_check_on_cpu']}")
    return "; ".join(parts)


def markdown(results: dict[str, Any], plot: str | None = None, earlier: list[dict[str, Any]] | None = None) -> str:
    """The report as Markdown: the summary table, the plot (``plot`` is its link or a
    data: URI), then one table per stage."""
    title = results.get("recipe", {}).get("name", "llmpress run")
    head = headers(results)
    lines = [f"# {title}", "", *([where_to_look(results), ""] if link_targets(results) else []), "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results)]
    if plot:
        lines += ["", f"![quality against size]({plot})", "", plot_note(results, earlier or [])]
    base = results["baseline"]["metrics"]
    for name, kind, metrics in entries(results):
        lines += ["", f"## {name} ({kind})", "", caption(metrics), "", "| section | metric | value | baseline | ratio |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in stage_table(metrics, base, kind == "baseline")]
        if metrics.get("generation_sample"):
            lines += ["", "Generation sample (greedy):", "", *("> " + line for line in str(metrics["generation_sample"]).splitlines())]
    return "\n".join(lines) + "\n"


LINKS = (("mlflow_run_url", "MLflow parent run"), ("mlflow_experiment_url", "MLflow runs"), ("mlflow_models_url", "MLflow models (compare)"),
         ("kfp_run_url", "Kubeflow run"))


def link_targets(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, address) of the pages that show this run: MLflow's and Kubeflow's."""
    found = results.get("tracking", {})
    return [(label, found[key]) for key, label in LINKS if found.get(key)]


def where_to_look(results: dict[str, Any]) -> str:
    """The links as one Markdown line (the KFP UI shows the report step's Markdown)."""
    return "Where to look: " + " · ".join(f"[{label}]({url})" for label, url in link_targets(results))


def plot_note(results: dict[str, Any], earlier: list[dict[str, Any]]) -> str:
    runs = {p["parent_run_id"] for p in earlier}
    experiment = results.get("tracking", {}).get("experiment")
    more = f", with {len(earlier)} stages of {len(runs)} earlier runs of experiment {experiment!r} in grey" if earlier else ""
    return f"Perplexity against size on disk for the baseline and every stage of this run{more}; the line joins the Pareto front (smaller and better)."


def earlier_points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Figures of earlier runs of the same MLflow experiment, when tracking is reachable."""
    from llmpress.components import tracking

    experiment = results.get("tracking", {}).get("experiment")
    if not experiment or not tracking.enabled():
        return []
    try:
        return tracking.experiment_points(experiment, exclude_parent=results.get("tracking", {}).get("parent_run_id"))
    except Exception as err:  # the report is still worth writing without the history
        log.warning("earlier runs of %r not read from MLflow (%s: %s)", experiment, type(err).__name__, err)
        return []


def write_report(results: dict[str, Any], folder: str | Path, earlier: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write report.md (plot linked), report.html (plot inline) and the plot into ``folder``.

    ``earlier`` defaults to the earlier runs of the experiment found in MLflow."""
    from llmpress.components.report import html as report_html
    from llmpress.components.report import plot as report_plot

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if earlier is None:
        earlier = earlier_points(results)
    paths = {"plot": folder / PLOT_NAME, "markdown": folder / "report.md", "html": folder / "report.html"}
    report_plot.quality_vs_size(results, earlier, paths["plot"])
    paths["markdown"].write_text(markdown(results, PLOT_NAME, earlier))
    paths["html"].write_text(report_html.html(results, data_uri(paths["plot"]), plot_note(results, earlier)))
    if "search" in results:  # a search's run: its candidates, front and winner after the usual tables
        from llmpress.components.report import search as search_report

        paths["front"] = search_report.front_plot(results, folder / search_report.FRONT_PLOT)
        with paths["markdown"].open("a") as md:
            md.write(search_report.markdown(results, search_report.FRONT_PLOT))
        page = paths["html"].read_text()
        paths["html"].write_text(page.replace("</body></html>", search_report.html_section(results, data_uri(paths["front"])) + "\n</body></html>"))
    return paths


def data_uri(png: Path) -> str:
    """The PNG inline, for viewers that cannot follow a relative link (KFP, MLflow)."""
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
