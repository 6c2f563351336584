"""What a search decides from its candidates' figures: which constraints of the budget a
candidate meets, the Pareto front, which candidates the cheap screening evaluation sends
on to the full one, and the winner; and the search's part of the report (table, front).

A candidate here is ``{"name", "label", "metrics"}`` (metrics with ratios to the
baseline, as the evaluate stage writes them). The budget is the recipe's
``search.budget`` as a dict: every key set there is one constraint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# constraint -> (what it reads, "max" if the figure must stay at or under the limit, "min" if at or over)
CONSTRAINTS: dict[str, tuple[str, str]] = {
    "size_bytes": ("size on disk in bytes", "max"),
    "size_ratio": ("size on disk / the baseline's", "max"),
    "perplexity_ratio": ("perplexity / the baseline's", "max"),
    "accuracy_recovery": ("task accuracy / the baseline's, the worst task", "min"),
    "latency_ratio": ("decode ms per token / the baseline's, smallest batch", "max"),
    "throughput_ratio": ("tokens per second / the baseline's, largest batch", "min"),
}
# what the screening evaluation measures exactly (size) or approximately (perplexity)
EXACT_AT_SCREEN = ("size_bytes", "size_ratio")
ESTIMATED_AT_SCREEN = ("perplexity_ratio",)
OBJECTIVES = {"perplexity": "perplexity_ratio", "size": "size_bytes_ratio"}
FRONT_PLOT = "search_front.png"


def constraint_value(metrics: dict[str, Any], constraint: str) -> float | None:
    """The figure a constraint limits, read from a candidate's metrics (None: not measured)."""
    if constraint == "size_bytes":
        return _number(metrics.get("size_bytes"))
    if constraint == "size_ratio":
        return _number(metrics.get("size_bytes_ratio"))
    if constraint == "perplexity_ratio":
        return _number(metrics.get("perplexity_ratio"))
    if constraint == "accuracy_recovery":
        found = [v for k, v in metrics.items() if k.startswith("task.") and k.endswith((".acc_ratio", ".exact_match_ratio")) and _number(v) is not None]
        return min(found) if found else None
    prefix = "decode_ms_per_token." if constraint == "latency_ratio" else "throughput_tok_s."
    found = sorted((_batch(k), v) for k, v in metrics.items() if k.startswith(prefix) and k.endswith("_ratio") and _number(v) is not None)
    if not found:
        return None
    return found[0][1] if constraint == "latency_ratio" else found[-1][1]


def violations(metrics: dict[str, Any], budget: dict[str, Any], only: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The constraints ``metrics`` break: ``{"constraint", "value", "limit", "by"}``; ``by``
    is the miss as a fraction of the limit. A figure that was not measured breaks its
    constraint (value None): a budget is met only when shown to be."""
    out = []
    for constraint, limit in budget.items():
        if limit is None or constraint not in CONSTRAINTS or (only is not None and constraint not in only):
            continue
        value = constraint_value(metrics, constraint)
        bound = CONSTRAINTS[constraint][1]
        if value is None:
            out.append({"constraint": constraint, "value": None, "limit": limit, "by": math.inf})
        elif (value > limit) if bound == "max" else (value < limit):
            out.append({"constraint": constraint, "value": value, "limit": limit, "by": abs(value - limit) / limit})
    return out


def describe(violation: dict[str, Any]) -> str:
    """One violation for reading: 'size_ratio 0.512 > 0.400 (28.0% over)'."""
    name, value, limit = violation["constraint"], violation["value"], violation["limit"]
    if value is None:
        return f"{name}: not measured (the evaluation has no {CONSTRAINTS[name][0]}; see search.budget in the README)"
    over = CONSTRAINTS[name][1] == "max"
    return f"{name} {_fmt(value)} {'>' if over else '<'} {_fmt(limit)} ({100 * violation['by']:.1f}% {'over' if over else 'under'})"


def pareto(points: dict[str, tuple[float, float]], slack: float = 0.0) -> list[str]:
    """Names of the points no other point beats: smaller or equal on both coordinates
    (size, perplexity) and strictly better on one. With ``slack`` a point must be beaten
    by more than that fraction of its perplexity (it could still be on the front once
    measured exactly). Sorted by size."""
    front = []
    for name, (size, ppl) in points.items():
        beaten = any(
            other != name and o_size <= size and o_ppl * (1 + slack) <= ppl and (o_size < size or o_ppl * (1 + slack) < ppl)
            for other, (o_size, o_ppl) in points.items()
        )
        if not beaten:
            front.append(name)
    return sorted(front, key=lambda n: points[n])


def screen_decision(screened: list[dict[str, Any]], budget: dict[str, Any], margin: float, keep: str = "front",
                    objective: str = "perplexity") -> dict[str, Any]:
    """Which candidates the full evaluation must still measure, from the screening figures.

    ``keep="front"``: every candidate that could be on the (size, perplexity) front,
    within ``margin`` of perplexity, since the screening's few windows only estimate it.
    ``keep="winner"``: only those that could still be the winner: not ruled out by size
    (exact at screening) or by perplexity (beyond its limit by more than ``margin``), and
    not beaten on the objective by another such candidate by more than ``margin`` (the
    report's front is then drawn from those alone). Either way, when the budget limits
    something the screening does not measure (accuracy, speed), the winner need not be on
    that front, so every candidate not ruled out is kept too.
    Returns ``{"full": [names], "dropped": {name: reason}, "margin", "keep"}``."""
    points = {c["name"]: (c["metrics"]["size_bytes"], c["metrics"]["perplexity"]) for c in screened}
    unmeasured = [k for k, v in budget.items() if v is not None and k not in EXACT_AT_SCREEN + ESTIMATED_AT_SCREEN]
    limit = budget.get("perplexity_ratio")
    ruled_out = {}
    for c in screened:
        misses = violations(c["metrics"], budget, EXACT_AT_SCREEN)
        ratio = c["metrics"].get("perplexity_ratio")
        if limit is not None and ratio is not None and ratio > limit * (1 + margin):
            misses.append({"constraint": "perplexity_ratio", "value": ratio, "limit": limit, "by": (ratio - limit) / limit})
        ruled_out[c["name"]] = misses
    if keep == "winner":
        candidates = _could_win({n: p for n, p in points.items() if not ruled_out[n]}, screened, limit, margin, objective)
    else:
        candidates = set(pareto(points, margin))
    full, dropped = [], {}
    for c in screened:
        name = c["name"]
        if name in candidates or (unmeasured and not ruled_out[name]):
            full.append(name)
            continue
        if keep == "winner":
            reasons = [describe(v) for v in ruled_out[name]] or [f"beaten on {objective} by more than {100 * margin:g}% at screening"]
        else:
            reasons = [f"dominated on (size, perplexity) by more than {100 * margin:g}% at screening"]
            reasons += [describe(v) for v in ruled_out[name]] if unmeasured else []
        dropped[name] = "; ".join(reasons)
    return {"full": full, "dropped": dropped, "margin": margin, "keep": keep}


def _could_win(points: dict[str, tuple[float, float]], screened: list[dict[str, Any]], limit: float | None, margin: float,
               objective: str) -> set[str]:
    """Among candidates within the budget at screening (``points``: size, perplexity), those
    no other beats on the objective by more than ``margin``. For the size objective, only a
    smaller candidate sure to meet the perplexity limit (below it by the margin) beats one."""
    if objective == "size":
        ratios = {c["name"]: c["metrics"].get("perplexity_ratio") for c in screened}
        sure = [n for n in points if limit is None or (ratios[n] is not None and ratios[n] * (1 + margin) <= limit)]
        return {n for n, (size, _) in points.items() if not any(points[o][0] < size for o in sure if o != n)}
    best = min((ppl for _, ppl in points.values()), default=math.inf)
    return {n for n, (_, ppl) in points.items() if ppl <= best * (1 + margin)}


def pick_winner(evaluated: list[dict[str, Any]], budget: dict[str, Any], objective: str) -> dict[str, Any]:
    """The best fully evaluated candidate that meets every constraint: lowest objective
    (perplexity ratio or size ratio), then smaller, then earlier in the space. When none
    does, the closest (fewest and smallest misses) and what it misses by:
    ``{"winner": name | None, "closest": name | None, "failed": [descriptions]}``."""
    key = OBJECTIVES[objective]
    meeting = [c for c in evaluated if not violations(c["metrics"], budget)]
    if meeting:
        best = min(meeting, key=lambda c: (c["metrics"].get(key, math.inf), c["metrics"].get("size_bytes", math.inf)))
        return {"winner": best["name"], "closest": None, "failed": []}
    if not evaluated:
        return {"winner": None, "closest": None, "failed": ["no candidate was evaluated"]}
    closest = min(evaluated, key=lambda c: (len(violations(c["metrics"], budget)), sum(v["by"] for v in violations(c["metrics"], budget))))
    return {"winner": None, "closest": closest["name"], "failed": [describe(v) for v in violations(closest["metrics"], budget)]}


def markdown(results: dict[str, Any], plot: str | None = None) -> str:
    """The search's section of the report: budget, winner, one row per candidate, the front."""
    search = results["search"]
    budget = ", ".join(f"{k} {'≤' if CONSTRAINTS[k][1] == 'max' else '≥'} {_fmt(v)}" for k, v in search["budget"].items() if v is not None)
    verdict = (f"**Winner: `{search['winner']}`** ({search['candidates_by_name'][search['winner']]['label']}), recipe in `winner.yaml`"
               if search["winner"] else f"**Nothing meets the budget.** Closest: `{search['closest']}`: {'; '.join(search['failed'])}")
    lines = ["", "## Search", "", f"Budget: {budget}; objective: {search['objective']}.", "", verdict, "",
             "| candidate | chain | evaluated | size MB | size ratio | ppl ratio | screen ppl ratio | on front | meets budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in search["candidates"]:
        m = c["full"] or {}
        s = c["screen"] or {}
        lines.append(f"| {c['name']} | {c['label']} | {'full' if c['full'] else 'screen only'} | {_mb(m or s)} | "
                     f"{_fmt(m.get('size_bytes_ratio', s.get('size_bytes_ratio')))} | {_fmt(m.get('perplexity_ratio'))} | {_fmt(s.get('perplexity_ratio'))} | "
                     f"{'yes' if c['name'] in search['front'] else ''} | {'yes' if c['meets_budget'] else c.get('why_not', '')} |")
    if plot:
        lines += ["", f"![Pareto front]({plot})"]
    cost = search.get("cost") or {}
    if cost:
        lines += ["", f"Evaluation time: {cost['evaluation_s']:.1f} s (screening {cost['screen_s']:.1f} s, full {cost['full_s']:.1f} s "
                  f"for {len(search['decision']['full'])} of {len(search['candidates'])} candidates); model-producing steps {cost['stages_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def html_section(results: dict[str, Any], plot_src: str | None) -> str:
    """The search's section of the HTML report: verdict, candidates table, front plot."""
    import html

    esc = html.escape
    lines = markdown(results).strip().splitlines()
    table = [line for line in lines if line.startswith("|") and not line.startswith("|---")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    text = [line.replace("**", "").replace("`", "") for line in lines if line and not line.startswith(("|", "#", "!["))]
    parts = ["<h2>Search</h2>", *(f"<p>{esc(t)}</p>" for t in text[:2])]
    parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in rows[0]) + "</tr></thead><tbody>"
                 + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:]) + "</tbody></table>")
    if plot_src:
        parts.append(f"<p><img alt='Pareto front' src='{plot_src}'></p>")
    parts += [f"<p class='note'>{esc(t)}</p>" for t in text[2:]]
    return "\n".join(parts)


def front_plot(results: dict[str, Any], path: str | Path) -> Path:
    """Perplexity against size and, when measured, against decode latency: every
    candidate (hollow: screening figures only), the front joined, the winner starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from llmpress.components.report.plot import save_figure

    search = results["search"]
    base = results["baseline"]["metrics"]
    latency_key = next(iter(sorted((k for k in base if k.startswith("decode_ms_per_token.")), key=_batch)), None)
    axes_keys = [("size_bytes", "size on disk (MB)", 1e6)] + ([(latency_key, f"{latency_key} (ms)", 1.0)] if latency_key else [])
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(6.4 * len(axes_keys), 4.8), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], axes_keys, strict=True):
        ax.scatter([base[key] / scale], [base["perplexity"]], marker="s", color="black", label="baseline", zorder=3)
        points = {}
        for i, c in enumerate(search["candidates"]):
            m = c["full"] or c["screen"]
            if key not in m:
                continue
            x, y = m[key] / scale, m["perplexity"]
            ax.scatter([x], [y], s=60, color=f"C{i % 10}", edgecolor="black", facecolor=f"C{i % 10}" if c["full"] else "none", zorder=3)
            ax.annotate(c["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            if c["full"]:
                points[c["name"]] = (x, y)
            if c["name"] == search["winner"]:
                ax.scatter([x], [y], s=260, marker="*", color="gold", edgecolor="black", zorder=4, label="winner")
        front = pareto(points)
        if len(front) > 1:
            ax.step([points[n][0] for n in front], [points[n][1] for n in front], where="post", color="C3", label="Pareto front", zorder=1)
        if key == "size_bytes" and search["budget"].get("size_ratio"):
            ax.axvline(base["size_bytes"] * search["budget"]["size_ratio"] / scale, color="0.5", linestyle="--", label="size budget")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return save_figure(fig, f"{results.get('recipe', {}).get('name', 'search')}: candidates and Pareto front (hollow: screened out)", path)


def _batch(key: str) -> int:
    """The batch size a speed key names (``throughput_tok_s.b8.in128.out32_ratio`` → 8)."""
    try:
        return int(key.split(".b", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return 0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) else None


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):  # ratios near 1 need their decimals: 1.0003, not 1
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def _mb(metrics: dict[str, Any]) -> str:
    return f"{metrics['size_bytes'] / 1e6:.2f}" if "size_bytes" in metrics else "—"
