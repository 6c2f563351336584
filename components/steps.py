"""What each pipeline step does around the stage logic: fetch inputs, open the
tracking run, call the stage, log its metrics, pass the run's history on.

No kfp here (``kubeflow.py`` holds the thin KFP shells that call these functions), so
every step runs and is tested as plain Python. ``history`` is the JSON string passed
from step to step: ``{"recipe", "tracking", "baseline", "stages"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from llmpress.components import artifacts, distill_step, report, tracking
from llmpress.components.data import DataSpec, load_texts
from llmpress.components.errors import UserError
from llmpress.components.modelio import ModelSpec, check_model_dir, fetch_model
from llmpress.components.stages import evaluate as evaluate_stage
from llmpress.components.stages import prune as prune_stage
from llmpress.components.stages import quantize as quantize_stage

log = logging.getLogger("llmpress")
LOG_MARK = "llmpress| "


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A user mistake found inside a step ends it with one line and exit code 2."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _log_to_stdout()
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            for line in err.problems:
                print(f"llmpress: error: {line}", flush=True)
            sys.exit(2)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _log_to_stdout() -> None:
    """llmpress's own progress lines, marked so that the local runner can show just them."""
    root = logging.getLogger("llmpress")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"{LOG_MARK}%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


@user_errors_exit
def import_model(model_json: str, recipe_json: str, model_out: str) -> str:
    """Materialize the model as a safetensors directory and open the parent run."""
    spec = ModelSpec.model_validate_json(model_json)
    recipe = json.loads(recipe_json)
    if spec.kind() == "s3":  # the component layer moves S3 bytes; stage logic sees a folder
        artifacts.get_dir(spec.source, model_out, plain_ok=True)
        check_model_dir(model_out, "model.source")
    else:
        fetch_model(spec, model_out)
    storage = recipe.get("storage", {}).get("root", "")
    spool = os.environ.get(tracking.SPOOL_ENV) or (f"{storage.rstrip('/')}/{recipe['name']}/tracking-spool" if storage else None)
    tracking.use_spool(spool)
    revision = tracking.git_revision()
    parent = tracking.start_parent(
        recipe["tracking"]["experiment"], recipe["name"], params=recipe,
        tags={"llmpress.recipe_hash": recipe_hash(recipe), "llmpress.recipe": recipe["name"], **_kfp_tags(),
              **({"llmpress.git_revision": revision} if revision else {})},
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        tracking.log_artifact(parent, Path(tmp) / "recipe.yaml")
    history = {
        "recipe": {"name": recipe["name"], "hash": recipe_hash(recipe)},
        "tracking": {"parent_run_id": parent, "experiment": recipe["tracking"]["experiment"], "spool": spool,
                     "register_as": recipe["tracking"].get("register_as") or recipe["name"]},
        "storage": storage,
        "baseline": {"metrics": {}, "run_id": None},
        "stages": [],
    }
    return json.dumps(history)


def _kfp_tags() -> dict[str, str]:
    run_id = os.environ.get("KFP_RUN_ID") or os.environ.get("KFP_POD_NAME")
    return {"llmpress.kfp_run": run_id} if run_id else {}


StageRunner = Callable[[str, str, dict[str, Any], DataSpec], dict[str, Any]]


def _calibrated(config_type: Any, run: Callable[..., dict[str, Any]]) -> StageRunner:
    """A runner for a stage that takes its config and calibration text (quantize, prune)."""

    def runner(model_in: str, model_out: str, stage: dict[str, Any], calibration: DataSpec) -> dict[str, Any]:
        config = config_type.model_validate(_config_fields(stage, config_type))
        data = local_data(config.calibration or calibration, "data.calibration")
        return run(model_in, model_out, config, data, load_texts(data, "data.calibration"))

    return runner


STAGE_RUNNERS: dict[str, StageRunner] = {
    "distill": distill_step.run,
    "quantize": _calibrated(quantize_stage.QuantizeConfig, quantize_stage.run),
    "prune": _calibrated(prune_stage.PruneConfig, prune_stage.run),
}
BUILT_KINDS = ("quantize", "evaluate", "prune", "distill")


def local_data(spec: DataSpec, field: str) -> DataSpec:
    """An ``s3://`` data source downloaded to a local file the stage can read."""
    if not spec.source.startswith("s3://"):
        return spec
    folder = Path(tempfile.mkdtemp(prefix="llmpress-data-"))  # lives as long as the step's process
    path = artifacts.get_file(spec.source, folder / spec.source.rsplit("/", 1)[-1])
    log.info("%s: downloaded %s (%.1f MB)", field, spec.source, path.stat().st_size / 1e6)
    return spec.model_copy(update={"source": str(path)})


def _publish(model_out: str, history: dict[str, Any], stage: str) -> str:
    """With ``storage.root`` on S3 the stage's model is also published there (by this
    component, not KFP's launcher: see docs/artifacts.md); returns where it lives."""
    root = history.get("storage") or ""
    if not artifacts.is_s3(root):
        return model_out
    uri = f"{root.rstrip('/')}/{history['recipe']['name']}/{history['recipe']['hash']}/{stage}"
    artifacts.put_dir(model_out, uri)
    return uri


def publish_metrics(metrics: Any, values: dict[str, Any]) -> None:
    """Put a step's figures on its KFP Metrics artifact (the run page shows them) and into
    the artifact's file. KFP keeps them in the artifact's metadata only, and kfp.local's
    cache takes an output whose file is missing for a lost one: without the file every
    evaluation would rerun on resume."""
    for key, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps({k: v for k, v in values.items() if isinstance(v, int | float | str)}, indent=1))


def _config_fields(stage: dict[str, Any], config_type: Any) -> dict[str, Any]:
    return {k: v for k, v in stage.items() if k in config_type.model_fields}


@user_errors_exit
def run_stage(model_in: str, model_out: str, stage_json: str, calibration_json: str, history_json: str) -> tuple[str, dict[str, Any]]:
    """Run one model-producing stage; returns (history, metrics)."""
    stage = json.loads(stage_json)
    history = json.loads(history_json)
    tracking.use_spool(history["tracking"].get("spool"))
    runner = STAGE_RUNNERS.get(stage["kind"])
    if runner is None:
        raise UserError.field(f"stages.{stage['name']}.kind", stage["kind"], f"not built yet in this version; built: {', '.join(BUILT_KINDS)}")
    run_id = tracking.start_child(history["tracking"]["parent_run_id"], stage["name"], stage)
    start = time.time()
    log.info("stage %s (%s) started", stage["name"], stage["kind"])
    try:
        # _context: what a long stage needs of the step (distill logs per step and keeps checkpoints under storage)
        context = {"run_id": run_id, "storage": history.get("storage") or "", "recipe": history["recipe"]}
        metrics = runner(model_in, model_out, {**stage, "_context": context}, DataSpec.model_validate_json(calibration_json))
    except BaseException:
        tracking.finish(run_id, "FAILED")
        raise
    metrics.setdefault("wall_time_s", time.time() - start)
    model_uri = _publish(model_out, history, stage["name"])
    tracking.log_metrics(run_id, metrics)
    tracking.finish(run_id)
    log.info("stage %s finished in %.1fs: %.2f MB, %.2f bits/parameter", stage["name"], metrics["wall_time_s"],
             metrics.get("size_bytes", 0) / 1e6, metrics.get("bits_per_parameter", 0))
    history["stages"].append({"name": stage["name"], "kind": stage["kind"], "metrics": metrics, "run_id": run_id, "model_uri": model_uri})
    return json.dumps(history), metrics


@user_errors_exit
def evaluate(model_in: str, config_json: str, data_json: str, target: str, history_json: str) -> tuple[str, dict[str, Any]]:
    """Evaluate a model. ``target`` is 'baseline', the name of the stage whose output this
    is (its record gains the metrics), or the name of an explicit evaluate stage."""
    history = json.loads(history_json)
    tracking.use_spool(history["tracking"].get("spool"))
    config = evaluate_stage.EvaluateConfig.model_validate_json(config_json)
    data = local_data(config.data or DataSpec.model_validate_json(data_json), f"stages.{target}.data" if config.data else "data.evaluation")
    texts = load_texts(data, "data.evaluation")
    baseline = history["baseline"]["metrics"] if target != "baseline" else None
    explicit = target != "baseline" and all(s["name"] != target for s in history["stages"])
    field = f"stages.{target}" if explicit else "evaluation"
    metrics = evaluate_stage.run(model_in, config, data, texts, baseline=baseline, field=field)
    parent = history["tracking"]["parent_run_id"]
    if target == "baseline":
        run_id = tracking.start_child(parent, "baseline", {"evaluation": json.loads(config_json)})
        history["baseline"] = {"metrics": metrics, "run_id": run_id}
    else:
        record = next((s for s in history["stages"] if s["name"] == target), None)
        if record is None:  # an explicit evaluate stage: a record of its own
            run_id = tracking.start_child(parent, target, {"evaluation": json.loads(config_json)})
            record = {"name": target, "kind": "evaluate", "metrics": {}, "run_id": run_id}
            history["stages"].append(record)
        else:
            run_id = record["run_id"]
        # the producing stage's own figures stay; the evaluation adds quality and ratios
        record["metrics"] = {**metrics, **record["metrics"]}
    tracking.log_metrics(run_id, metrics)
    if target == "baseline" or record["kind"] == "evaluate":
        tracking.finish(run_id)
    log.info("evaluation of %s: perplexity %.3f over %d tokens", target, metrics["perplexity"], metrics["eval_tokens"])
    return json.dumps(history), metrics


@user_errors_exit
def finish(history_json: str, results_path: str, report_path: str, html_path: str | None = None) -> None:
    """Write results.json and the report (Markdown and HTML, plot inline); log them and
    the plot on the parent run, register the final model and close the run."""
    history = json.loads(history_json)
    tracking.use_spool(history["tracking"].get("spool"))
    results = {k: history[k] for k in ("recipe", "tracking", "baseline", "stages")}
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    Path(results_path).write_text(json.dumps(results, indent=2))
    with tempfile.TemporaryDirectory() as tmp:
        earlier = report.earlier_points(results)
        written = report.write_report(results, tmp, earlier)
        # KFP's viewers cannot follow a relative link: the plot goes inline
        Path(report_path).write_text(report.markdown(results, report.data_uri(written["plot"]), earlier))
        if html_path:
            Path(html_path).parent.mkdir(parents=True, exist_ok=True)
            Path(html_path).write_text(written["html"].read_text())
        parent = history["tracking"]["parent_run_id"]
        if parent:
            final = history["stages"][-1]["metrics"] if history["stages"] else history["baseline"]["metrics"]
            tracking.log_metrics(parent, {f"final.{k}": v for k, v in final.items()})
            tracking.log_metrics(parent, {f"baseline.{k}": v for k, v in history["baseline"]["metrics"].items()})
            _log_named(parent, results_path, "results.json")
            for path in written.values():
                _log_named(parent, str(path), path.name)
            produced = [s for s in history["stages"] if s.get("model_uri")]
            if produced:
                name = history["tracking"].get("register_as") or history["recipe"]["name"]
                tracking.register_model(name, produced[-1]["model_uri"], parent, produced[-1]["metrics"])
            tracking.finish(parent)
    print(report.table(results), flush=True)


def _log_named(run_id: str, path: str, name: str) -> None:
    """Log a file under a fixed name (KFP output paths end in the output's name)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / name
        shutil.copyfile(path, target)
        tracking.log_artifact(run_id, target)
