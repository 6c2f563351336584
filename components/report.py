"""The run report: a results table for the terminal and Markdown for files and UIs.

``results`` is ``{"baseline": {"metrics": {...}}, "stages": [{"name", "kind", "metrics"}]}``.
"""

from __future__ import annotations

from typing import Any

COLUMNS = ("stage", "kind", "size MB", "params M", "perplexity", "ppl ratio", "size ratio", "wall s")


def rows(results: dict[str, Any]) -> list[list[str]]:
    """One row for the baseline, then one per stage, formatted for reading."""
    out = [_row("baseline", "baseline", results["baseline"]["metrics"])]
    out += [_row(s["name"], s["kind"], s["metrics"]) for s in results["stages"]]
    return out


def _row(name: str, kind: str, m: dict[str, Any]) -> list[str]:
    def fmt(key: str, scale: float = 1.0, digits: int = 2) -> str:
        value = m.get(key)
        return "—" if value is None else f"{value / scale:.{digits}f}"

    wall = m.get("wall_time_s", m.get("eval_wall_time_s"))
    return [
        name, kind, fmt("size_bytes", 1e6), fmt("num_parameters", 1e6), fmt("perplexity"),
        fmt("perplexity_ratio", digits=3), fmt("size_bytes_ratio", digits=3),
        "—" if wall is None else f"{wall:.1f}",
    ]


def table(results: dict[str, Any]) -> str:
    """A plain-text table, columns aligned."""
    body = [list(COLUMNS)] + rows(results)
    widths = [max(len(r[i]) for r in body) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The report as Markdown: the summary table, then every metric of every stage."""
    title = results.get("recipe", {}).get("name", "llmpress run")
    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results)]
    entries = [("baseline", "baseline", results["baseline"]["metrics"])]
    entries += [(s["name"], s["kind"], s["metrics"]) for s in results["stages"]]
    for name, kind, metrics in entries:
        lines += ["", f"## {name} ({kind})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
