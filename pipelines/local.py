"""Run a recipe's pipeline on this machine through Kubeflow's local runner.

The embedded default: kfp.local's SubprocessRunner (each step a subprocess of this
Python), artifacts in a local folder, MLflow in a local sqlite file.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from llmpress.components import report
from llmpress.components.data import DataSpec, check_source
from llmpress.components.errors import UserError
from llmpress.components.kubeflow.steps import LOG_MARK
from llmpress.components.models.io import check_source as check_model_source
from llmpress.components.tracking.redaction import redacted
from llmpress.parameters import effective_recipe
from llmpress.pipeline import build_pipeline
from llmpress.recipe import Recipe


class StageFailed(Exception):
    """A step of the local pipeline failed; its own log says why.

    ``user_error`` is set when the step stopped on a user mistake (it printed an
    ``llmpress: error:`` line, already shown), as opposed to a crash."""

    def __init__(self, message: str, user_error: bool) -> None:
        super().__init__(message)
        self.user_error = user_error


WINNER_RECIPE = "winner.yaml"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP_DONE = re.compile(r"Task '([^']+)' finished with status (\w+)")


class _ProgressFilter(io.TextIOBase):
    """A stdout that logs every line and shows the ones a person wants to watch."""

    def __init__(self, terminal: Any, log_file: Any, verbose: bool) -> None:
        self.terminal, self.log_file, self.verbose, self.pending = terminal, log_file, verbose, ""
        self.saw_user_error = False

    def write(self, text: str) -> int:
        written = len(text)
        text = redacted(text)  # a URI with credentials (MLFLOW_TRACKING_URI) reaches neither the log nor the terminal
        self.log_file.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            shown = self._shown(_ANSI.sub("", line))
            if shown is not None:
                self.terminal.write(shown + "\n")
        self.terminal.flush()
        return written

    def _shown(self, line: str) -> str | None:
        if self.verbose:
            return line
        if LOG_MARK in line:
            return "  " + line.split(LOG_MARK, 1)[1]
        if "llmpress: error:" in line:
            self.saw_user_error = True
            return line.strip()
        done = _STEP_DONE.search(line)
        if done:
            return f"  step {done.group(1)}: {done.group(2)}"
        return None

    def flush(self) -> None:
        self.log_file.flush()
        self.terminal.flush()


def default_out_dir(recipe: Recipe) -> Path:
    root = recipe.storage.root
    if root.startswith("s3://"):
        raise UserError.field("storage.root", root, "local runs keep artifacts in a local folder; pass --out DIR")
    return Path(root) / recipe.name


def preflight(recipe: Recipe) -> None:
    """Catch missing local models and data files before any step starts."""
    for field, model in (("model", recipe.model), ("teacher", recipe.teacher)):
        if model is not None:
            check_model_source(model, field)
    sources = [("data.calibration", recipe.data.calibration), ("data.evaluation", recipe.data.evaluation)]
    stages = [(f"stages[{i}]", stage) for i, stage in enumerate(recipe.stages)]
    stages += [(f"search candidate {c.name}, stage {stage.name}", stage) for c, chain in recipe.search_candidates() for stage in chain]
    for where, stage in stages:
        for key in ("calibration", "data"):
            if isinstance(getattr(stage, key, None), DataSpec):
                sources.append((f"{where}.{key}", getattr(stage, key)))
    for field, spec in sources:
        check_source(spec, field)


def run_local(recipe: Recipe, out_dir: Path, verbose: bool = False, cache: bool = True, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole pipeline; write results.json and report.md into ``out_dir``.

    ``values`` are run parameters (``--set``), passed to the pipeline as a Kubeflow run
    passes them; its first step validates them again, as on a cluster. Every line the
    runner and the steps print goes to ``out_dir/run.log``; the terminal shows
    llmpress's progress lines, step outcomes and errors (all of it if ``verbose``)."""
    import kfp.local

    values = values or {}
    preflight(effective_recipe(recipe, values))  # a bad value is one line here, before any step
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out_dir / 'mlflow.db'}")
    os.environ.setdefault("LLMPRESS_TRACKING_SPOOL", str(out_dir / "tracking-spool"))
    # a rerun into the same folder reuses every step whose inputs are unchanged (docs/artifacts.md)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(out_dir / "artifacts"), raise_on_error=True,
                   enable_caching=cache, cache_root=str(out_dir / "cache"))
    pipeline = build_pipeline(recipe)
    log_path = out_dir / "run.log"
    with warnings.catch_warnings(), log_path.open("a", encoding="utf-8") as log_file:
        # the release image name has no 'python' in it, which kfp.local warns about;
        # settings for the cluster (display names, resources) have no effect locally
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        real_stdout = sys.stdout
        sys.stdout = progress = _ProgressFilter(real_stdout, log_file, verbose)
        try:
            task = pipeline(**values)
        except RuntimeError as err:
            first = str(err).splitlines()[0] if str(err) else "a pipeline step failed"
            raise StageFailed(f"{_ANSI.sub('', first)}; full log: {log_path}", progress.saw_user_error) from None
        finally:
            sys.stdout = real_stdout
    results = json.loads(Path(task.output.path).read_text())
    text = json.dumps(results, indent=2)
    results_file = out_dir / "results.json"
    unchanged = results_file.is_file() and results_file.read_text() == text and (out_dir / "report.md").is_file()
    if not unchanged:  # a fully cached rerun has nothing new to report (and skips MLflow and matplotlib)
        results_file.write_text(text)
        report.write_report(results, out_dir)  # report.md, report.html and the plot
    if "search" in results:  # a search's winner as a plain recipe beside the results, to rerun or commit
        winner = results["search"].get("winner_recipe")
        if winner:
            (out_dir / WINNER_RECIPE).write_text(winner)
        else:  # an earlier search's winner must not pass for this one's
            (out_dir / WINNER_RECIPE).unlink(missing_ok=True)
    return results
