"""Run a recipe's pipeline on this machine through Kubeflow's local runner.

The embedded default: kfp.local's SubprocessRunner (each step a subprocess of this
Python), artifacts in a local folder, MLflow in a local sqlite file.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from llmpress.components import report
from llmpress.components.errors import UserError
from llmpress.pipeline import build_pipeline
from llmpress.recipe import Recipe


class StageFailed(Exception):
    """A step of the local pipeline failed; its own log (above) says why."""


def default_out_dir(recipe: Recipe) -> Path:
    root = recipe.storage.root
    if root.startswith("s3://"):
        raise UserError.field("storage.root", root, "local runs keep artifacts in a local folder; pass --out DIR")
    return Path(root) / recipe.name


def run_local(recipe: Recipe, out_dir: Path) -> dict[str, Any]:
    """Run the whole pipeline; write results.json and report.md into ``out_dir``."""
    import kfp.local

    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out_dir / 'mlflow.db'}")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(out_dir / "artifacts"), raise_on_error=True)
    pipeline = build_pipeline(recipe)
    with warnings.catch_warnings():
        # the release image name has no 'python' in it, which kfp.local warns about
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            task = pipeline()
        except RuntimeError as err:
            raise StageFailed(str(err).splitlines()[0] if str(err) else "a pipeline step failed") from None
    results = json.loads(Path(task.output.path).read_text())
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "report.md").write_text(report.markdown(results))
    return results
