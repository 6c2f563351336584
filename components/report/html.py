"""The report as one self-contained HTML page (plot inline): what the Kubeflow UI shows
for the report step's HTML artifact, and what MLflow shows on the parent run."""

from __future__ import annotations

import html as _html
from typing import Any

from llmpress.components import report

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #1f2328; max-width: 1150px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 9px; text-align: right; }
th { background: #f6f8fa; } td:first-child, td:nth-child(2), th:first-child { text-align: left; }
.caption, .note { color: #57606a; font-size: 12px; } .section { color: #57606a; font-style: italic; }
blockquote { font-family: ui-monospace, monospace; font-size: 12px; background: #f6f8fa; margin: 6px 0; padding: 8px 12px; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #d0d7de; }
"""


def html(results: dict[str, Any], plot_src: str | None, plot_note: str = "") -> str:
    """The page: summary table, plot, then one table per stage with ratios to the baseline."""
    esc = _html.escape
    title = results.get("recipe", {}).get("name", "llmpress run")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)} — llmpress report</title><style>{STYLE}</style></head><body>"]
    parts.append(f"<h1>{esc(title)}</h1><p class='note'>recipe hash {esc(str(results.get('recipe', {}).get('hash', '—')))}; "
                 f"MLflow parent run {esc(str(results.get('tracking', {}).get('parent_run_id') or '—'))}</p>")
    links = " · ".join(f"<a href='{esc(url, quote=True)}'>{esc(label)}</a>" for label, url in report.link_targets(results))
    if links:
        parts.append(f"<p class='note'>Where to look: {links}</p>")
    parts.append(_table(report.headers(results), report.rows(results)))
    if plot_src:
        parts.append(f"<p><img alt='quality against size' src='{plot_src}'></p><p class='note'>{esc(plot_note)}</p>")
    base = results["baseline"]["metrics"]
    for name, kind, metrics in report.entries(results):
        parts.append(f"<h2>{esc(name)} <span class='section'>({esc(kind)})</span></h2><p class='caption'>{esc(report.caption(metrics))}</p>")
        parts.append(_table(["section", "metric", "value", "baseline", "ratio"], [list(r) for r in report.stage_table(metrics, base, kind == "baseline")]))
        if metrics.get("generation_sample"):
            parts.append(f"<p class='caption'>generation sample (greedy)</p><blockquote>{esc(str(metrics['generation_sample']))}</blockquote>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _table(head: list[str], body: list[list[str]]) -> str:
    esc = _html.escape
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
    return "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + f"</tr></thead><tbody>{rows}</tbody></table>"
