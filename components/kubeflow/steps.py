"""What each pipeline step does around the stage logic: fetch inputs, call the stage,
record what it did, pass the records on.

No kfp here (``kubeflow.py`` holds the thin KFP shells that call these functions), so
every step runs and is tested as plain Python. Two JSON strings pass from step to
step, each a pure function of the steps before it (so KFP's cache reuses a step
whenever its own inputs are unchanged): the stages' records ``{"stages": [...]}``
through the model-producing steps, and the evaluations' records ``{"baseline",
"evaluations"}`` through the evaluation steps. The report step (``finish``) merges
them and does everything tied to one pipeline run: the MLflow parent run, nesting the
stages' runs, registering the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from llmpress.components import artifacts, report, tracking
from llmpress.components.artifacts.validation import TREE
from llmpress.components.data import DataSpec, describe, load_texts
from llmpress.components.errors import UserError
from llmpress.components.kubeflow import distill_step, model_records
from llmpress.components.models.gguf import is_gguf
from llmpress.components.models.io import ModelSpec, check_model_dir, fetch_model
from llmpress.components.report import search as search_report
from llmpress.components.stages import evaluate as evaluate_stage
from llmpress.components.stages import prune as prune_stage
from llmpress.components.stages import quantize as quantize_stage
from llmpress.components.tracking import links, logged_models, system_metrics
from llmpress.components.tracking.redaction import redacted

log = logging.getLogger("llmpress")
LOG_MARK = "llmpress| "
POINTER = "llmpress-pointer.json"  # what a KFP model artifact holds when the bytes live in S3
POINTER_FORMAT = "llmpress-pointer/1"


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A user mistake found inside a step ends it with one line and exit code 2."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _log_to_stdout()
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            for line in err.problems:
                print(f"llmpress: error: {redacted(line)}", flush=True)
            sys.exit(2)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


class _RedactingFormatter(logging.Formatter):
    """A pod's log is read by many: no credentials in a URI reach it."""

    def format(self, record: logging.LogRecord) -> str:
        return redacted(super().format(record))


def _log_to_stdout() -> None:
    """llmpress's own progress lines, marked so that the local runner can show just them."""
    root = logging.getLogger("llmpress")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_RedactingFormatter(f"{LOG_MARK}%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def _context(context_json: str) -> dict[str, str]:
    """What every step knows of its recipe: ``{"recipe", "experiment", "storage"}``."""
    context = json.loads(context_json)
    tracking.use_spool(spool_for(context["recipe"], context.get("storage") or ""))
    return context


def spool_for(recipe: str, storage: str) -> str | None:
    return os.environ.get(tracking.SPOOL_ENV) or (f"{storage.rstrip('/')}/{recipe}/tracking-spool" if storage else None)


def step_key(*parts: str) -> str:
    """A step's identity from its inputs: the same inputs give the same key on every run."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def input_identity(model_dir: str) -> str:
    """What a model input is: its pointer (content-addressed), or for a folder the
    names, sizes and modification times of its files (a rerun upstream changes them)."""
    pointer = Path(model_dir) / POINTER
    if pointer.is_file():
        return pointer.read_text()
    folder = Path(model_dir)
    return json.dumps(sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()))


def _scratch(prefix: str) -> Path:
    """A folder on the step's scratch volume (``LLMPRESS_SCRATCH``, set from the
    recipe's ``resources.scratch``), else the system's temporary folder."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("LLMPRESS_SCRATCH") or None))


@contextmanager
def model_input(model_dir: str) -> Iterator[str]:
    """The step's input model as a local folder. A pointer (what KFP passes when
    ``storage.root`` is on S3) is downloaded by llmpress itself, checksums verified,
    into scratch, and removed when the step is done with it."""
    pointer = Path(model_dir) / POINTER
    if not pointer.is_file():
        yield model_dir
        return
    ref = read_pointer(pointer)
    local = _scratch("llmpress-in-")
    try:
        artifacts.get_dir(ref["uri"], local, plain_ok=ref.get("plain", False), tree=ref.get("tree") or None, pins=ref.get("objects"))
        if ref.get("plain"):  # only model.source is ever pointed at without a manifest
            check_model_dir(str(local), "model.source")
        yield str(local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


class ModelOutput:
    """Where a step writes its model. With ``storage.root`` on S3 the model goes to
    ``<root>/<recipe>/models/<step>/<key>`` through llmpress's store (parallel
    multipart, checksums, atomic commit) and KFP's output artifact holds only a
    pointer to it, so KFP's launcher never copies model weights (docs/artifacts.md).
    Otherwise the step writes straight into KFP's output folder."""

    def __init__(self, kfp_dir: str, context: dict[str, str], step: str, key: str) -> None:
        storage = context.get("storage") or ""
        self.kfp_dir = kfp_dir
        self.uri = f"{storage.rstrip('/')}/{context['recipe']}/models/{step}/{key}" if artifacts.is_s3(storage) else None
        self.path = str(_scratch("llmpress-out-")) if self.uri else kfp_dir

    def commit(self) -> str:
        """Publish what was written; returns where the model lives."""
        if self.uri is None:
            return self.kfp_dir
        stats = artifacts.put_dir(self.path, self.uri)
        write_pointer(self.kfp_dir, self.uri, stats.tree, sum(p.stat().st_size for p in Path(self.path).rglob("*") if p.is_file()))
        return self.uri

    def discard(self) -> None:
        if self.uri is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def read_pointer(path: Path) -> dict[str, Any]:
    """A pointer file, checked: a step's input artifact is written by the step before it,
    but it travels through KFP's store, so it is read like anything else from outside."""
    try:
        ref = json.loads(path.read_bytes()[: 1 << 20])
    except (ValueError, RecursionError):
        ref = None
    problem = None
    if not isinstance(ref, dict) or ref.get("format") != POINTER_FORMAT:
        problem = f"format must be {POINTER_FORMAT!r}"
    elif not isinstance(ref.get("uri"), str) or not artifacts.is_s3(ref["uri"]):
        problem = "uri must be an s3:// URI"
    elif not isinstance(ref.get("tree"), str) or not (ref["tree"] == "" or TREE.fullmatch(ref["tree"])):
        problem = "tree must be 16 hex digits"
    elif not isinstance(ref.get("plain", False), bool):
        problem = "plain must be true or false"
    elif ref.get("plain") and not (isinstance(ref.get("objects"), list) and all(
            isinstance(o, dict) and set(o) == {"path", "size", "etag"} and isinstance(o["path"], str) and type(o["size"]) is int
            and isinstance(o["etag"], str) for o in ref["objects"])):
        problem = "a plain prefix's pointer pins its objects: objects must list path, size and etag of each"
    if problem:
        raise UserError(f"{path}: not an llmpress model pointer — {problem}")
    return ref


def write_pointer(kfp_dir: str, uri: str, tree: str, size: int, plain: bool = False, objects: list[dict[str, Any]] | None = None) -> None:
    """The pointer a KFP model artifact holds: a committed version (``tree``), or for a
    prefix without a manifest the objects (path, size, ETag) that every reader must find."""
    Path(kfp_dir).mkdir(parents=True, exist_ok=True)
    ref = {"format": POINTER_FORMAT, "uri": uri, "tree": tree, "bytes": size, "plain": plain, **({"objects": objects} if plain else {})}
    (Path(kfp_dir) / POINTER).write_text(json.dumps(ref, indent=1))


@user_errors_exit
def import_model(model_json: str, context_json: str, model_out: str) -> None:
    """Materialize the model as a safetensors directory (or, with ``storage.root`` on
    S3, as a committed artifact there and a pointer to it). No tracking here: its cache
    key is the model's spec alone, so editing any other part of the recipe reuses it."""
    spec = ModelSpec.model_validate_json(model_json)
    context = _context(context_json)
    if spec.kind() == "s3" and not is_gguf(spec.source) and artifacts.is_s3(context.get("storage") or ""):
        pinned = artifacts.pin(spec.source)  # already in S3: point at it, copy nothing, but pin what is there now
        write_pointer(model_out, spec.source, pinned["tree"], pinned["bytes"], plain=pinned["plain"], objects=pinned.get("objects"))
        log.info("model %s stays where it is; the steps read it from there", spec.source)
        return
    out = ModelOutput(model_out, context, "import", step_key(model_json))
    try:
        if spec.kind() == "s3" and is_gguf(spec.source):  # one file, converted here (cached by its content)
            with tempfile.TemporaryDirectory(prefix="llmpress-gguf-", dir=os.environ.get("LLMPRESS_SCRATCH") or None) as folder:
                local = artifacts.get_file(spec.source, Path(folder) / spec.source.rsplit("/", 1)[-1])
                fetch_model(spec.model_copy(update={"source": str(local)}), out.path)
        elif spec.kind() == "s3":  # the component layer moves S3 bytes; stage logic sees a folder
            artifacts.get_dir(spec.source, out.path, plain_ok=True)
            check_model_dir(out.path, "model.source")
        else:
            fetch_model(spec, out.path)
        out.commit()
    finally:
        out.discard()


def open_parent_run(recipe: dict[str, Any]) -> str | None:
    """The pipeline run's parent run (the plain pipeline's and a search's report step open
    it alike): tags, the recipe as params and as recipe.yaml."""
    revision = tracking.git_revision()
    parent = tracking.start_parent(
        recipe["tracking"]["experiment"], recipe["name"], params=recipe,
        tags={"llmpress.recipe_hash": recipe_hash(recipe), "llmpress.recipe": recipe["name"], **links.kfp_tags(), **_source_tags(recipe["name"], revision),
              **({"llmpress.git_revision": revision} if revision else {})},
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        tracking.log_artifact(parent, Path(tmp) / "recipe.yaml")
    return parent


def _source_tags(recipe: str, revision: str | None = None) -> dict[str, str]:
    """MLflow's Source column: what ran (the recipe's pipeline, in Kubeflow or locally) and its commit."""
    where = f"kubeflow run {links.kfp_run_id()}" if links.kfp_run_id() else "llmpress run"
    commit = (revision or "").removesuffix("-dirty")
    return {"mlflow.source.type": "JOB", "mlflow.source.name": f"{where}: recipe {recipe}",
            **({"mlflow.source.git.commit": commit} if len(commit) == 40 else {})}


StageRunner = Callable[[str, str, dict[str, Any], DataSpec], dict[str, Any]]


def _calibrated(config_type: Any, run: Callable[..., dict[str, Any]], resumable: bool = False) -> StageRunner:
    """A runner for a stage that takes its config and calibration text (quantize, prune).
    A resumable one gets the step's key, which names its input by content (a pointer's
    tree hash), so a retried step finds what its failed try persisted."""

    def runner(model_in: str, model_out: str, stage: dict[str, Any], calibration: DataSpec) -> dict[str, Any]:
        config = config_type.model_validate(_config_fields(stage, config_type))
        data = local_data(config.calibration or calibration, "data.calibration")
        resume = {"resume_key": stage["_context"]["recipe"]["hash"]} if resumable and "_context" in stage else {}
        return run(model_in, model_out, config, data, load_texts(data, "data.calibration"), **resume)

    return runner


STAGE_RUNNERS: dict[str, StageRunner] = {
    "distill": distill_step.run,
    "quantize": _calibrated(quantize_stage.QuantizeConfig, quantize_stage.run, resumable=True),
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


def _stage_records(stages_json: str) -> dict[str, Any]:
    """The stages' records passed along the model-producing steps ('' before the first)."""
    return json.loads(stages_json) if stages_json else {"stages": []}


@user_errors_exit
def run_stage(model_in: str, model_out: str, stage_json: str, calibration_json: str, context_json: str, stages_json: str) -> tuple[str, dict[str, Any]]:
    """Run one model-producing stage; returns (the stages' records with this one added, metrics).

    The stage's MLflow run is its own (training curves show live); the report step
    nests it under the pipeline run's parent. Inputs are all this step depends on:
    the model, the stage's settings, the calibration data and the records of the
    stages before it, so a rerun reuses it while those are unchanged."""
    stage = json.loads(stage_json)
    context = _context(context_json)
    chain = _stage_records(stages_json)
    runner = STAGE_RUNNERS.get(stage["kind"])
    if runner is None:
        raise UserError.field(f"stages.{stage['name']}.kind", stage["kind"], f"not built yet in this version; built: {', '.join(BUILT_KINDS)}")
    key = step_key(input_identity(model_in), stage_json, calibration_json, stages_json)
    run_id = tracking.start_run(context["experiment"], stage["name"], stage,
                                tags={"llmpress.recipe": context["recipe"], "llmpress.step_key": key, **links.kfp_tags(), **_source_tags(context["recipe"])})
    start = time.time()
    log.info("stage %s (%s) started", stage["name"], stage["kind"])
    out = ModelOutput(model_out, context, stage["name"], key)
    try:
        with model_input(model_in) as local_in:
            # _context: what a long stage needs of the step (distill logs per step and keeps checkpoints under storage)
            step_context = {"run_id": run_id, "storage": context.get("storage") or "", "recipe": {"name": context["recipe"], "hash": key}}
            with system_metrics.recording(run_id):
                metrics = runner(local_in, out.path, {**stage, "_context": step_context}, DataSpec.model_validate_json(calibration_json))
        metrics.setdefault("wall_time_s", time.time() - start)
        model_uri = out.commit()
    except BaseException:
        tracking.finish(run_id, "FAILED")
        raise
    finally:
        out.discard()
    used = model_records.stage_dataset(stage, DataSpec.model_validate_json(calibration_json), metrics)
    logged_models.log_datasets(run_id, [used] if used else [])
    model_id = logged_models.log_model(run_id, context["experiment"], stage["name"], model_uri, stage["kind"], model_records.model_params(stage),
                                       {"llmpress.recipe": context["recipe"], "llmpress.step_key": key})
    tracking.log_metrics(run_id, metrics, model=model_id)
    tracking.finish(run_id)
    bits = f", {metrics['bits_per_parameter']:.2f} bits/parameter" if "bits_per_parameter" in metrics else ""
    log.info("stage %s finished in %.1fs: %.2f MB%s", stage["name"], metrics["wall_time_s"], metrics.get("size_bytes", 0) / 1e6, bits)
    chain["stages"].append({"name": stage["name"], "kind": stage["kind"], "metrics": metrics, "run_id": run_id, "model_uri": model_uri, "key": key,
                            "model_id": model_id, "datasets": [used] if used else []})
    return json.dumps(chain), metrics


def _model_location(model_dir: str) -> str:
    """Where a step's input model lives: the URI its pointer names, or the folder."""
    pointer = Path(model_dir) / POINTER
    return read_pointer(pointer)["uri"] if pointer.is_file() else str(Path(model_dir).resolve())


def measurement_key(config_json: str, data_json: str) -> str:
    """What makes two evaluations comparable: the text and windows, stride and tasks
    (an evaluation's own ``data`` replaces the recipe's)."""
    config = json.loads(config_json)
    settings = {k: config.get(k) for k in ("stride", "tasks", "task_limit", "num_fewshot")}
    data = config.get("data") or json.loads(data_json)
    return step_key(json.dumps(DataSpec.model_validate(data).model_dump(), sort_keys=True), json.dumps(settings, sort_keys=True))


@user_errors_exit
def evaluate(model_in: str, config_json: str, data_json: str, target: str, field: str, evals_json: str) -> tuple[str, dict[str, Any]]:
    """Evaluate a model; returns (the evaluations' records with this one added, metrics).

    ``target`` is 'baseline' (which starts the records), the name of the stage whose
    output this is, or the name of an explicit evaluate stage; ``field`` names the
    recipe settings that apply, for messages. Nothing goes to MLflow here: the report
    step logs every evaluation into its pipeline run, so that a cached evaluation is
    still recorded in the run that reuses it."""
    evals = json.loads(evals_json) if evals_json else {"baseline": None, "evaluations": []}
    config = evaluate_stage.EvaluateConfig.model_validate_json(config_json)
    key = measurement_key(config_json, data_json)
    baselines = evals.setdefault("baselines", {})
    data = local_data(config.data or DataSpec.model_validate_json(data_json), f"{field}.data" if config.data else "data.evaluation")
    texts = load_texts(data, "data.evaluation")
    # ratios only against a baseline measured on the same data and windows (the pipeline adds one where needed)
    baseline = baselines.get(key) if target != "baseline" else None
    if target != "baseline" and baseline is None:
        log.info("evaluation of %s: no baseline was measured with these settings, so no ratios", target)
    with model_input(model_in) as local:
        metrics = evaluate_stage.run(local, config, data, texts, baseline=baseline, field=field)
    if baseline is not None and evals["baseline"] and baseline is not evals["baseline"]["metrics"]:
        metrics["baseline_perplexity"] = baseline["perplexity"]  # not the report's baseline row: say what the ratio is against
    spec = config.data or DataSpec.model_validate_json(data_json)
    record = {"target": target, "metrics": metrics, "config": json.loads(config_json), "model_uri": _model_location(model_in),
              "dataset": logged_models.dataset_input(describe(spec, data.source if spec.source.startswith("s3://") else None), "evaluation")}
    if target == "baseline":
        baselines[key] = metrics
        evals["baseline"] = evals["baseline"] or record  # the first is the report's baseline row
    else:
        evals["evaluations"].append(record)
    log.info("evaluation of %s: perplexity %.3f over %d tokens", target, metrics["perplexity"], metrics["eval_tokens"])
    return json.dumps(evals), metrics


@user_errors_exit
def finish(stages_json: str, evals_json: str, recipe_json: str, results_path: str, report_path: str, html_path: str | None = None) -> None:
    """Merge the stages' and evaluations' records into results.json and the report
    (Markdown and HTML, plot inline); open the pipeline run's parent run in MLflow, nest
    every stage's run under it (a copy for a run an earlier pipeline run already holds,
    because its step came from the cache), log the evaluations, register the final
    model and close the run."""
    recipe = json.loads(recipe_json)
    tracking.use_spool(spool_for(recipe["name"], recipe.get("storage", {}).get("root", "")))
    produced = {s["name"]: s for s in _stage_records(stages_json)["stages"]}
    evals = json.loads(evals_json)
    evaluated = {e["target"]: e for e in evals["evaluations"]}
    experiment = recipe["tracking"]["experiment"]
    parent = open_parent_run(recipe)

    def evaluation_run(name: str, evaluation: dict[str, Any], model_id: str | None) -> tuple[str | None, str | None]:
        """The nested run of an evaluation that is not a stage's (the baseline, an evaluate
        stage), and the logged model it measured (the baseline's is made here)."""
        run_id = tracking.start_child(parent, name, {"evaluation": evaluation["config"]}, experiment, tags=_source_tags(recipe["name"]))
        if name == "baseline":
            model_id = model_records.baseline_model(run_id, experiment, evaluation, recipe)
        model_records.log_evaluation(run_id, evaluation, model_id)
        tracking.finish(run_id)
        return run_id, model_id

    baseline_run, current_model = evaluation_run("baseline", evals["baseline"], None)
    baseline_model = current_model
    provenance = {k: v for k, v in evals["baseline"]["metrics"].items() if k.startswith("source_")}
    for run_id in (parent, baseline_run) if provenance else ():  # a GGUF source: its quantization type and hash, searchable in MLflow
        tracking.log_params(run_id, provenance)
    records = []
    for stage in recipe["stages"]:
        name, evaluation = stage["name"], evaluated.get(stage["name"])
        if stage["kind"] == "evaluate":  # it measured the latest model
            run_id, _ = evaluation_run(name, evaluation, current_model)
            records.append({"name": name, "kind": "evaluate", "metrics": evaluation["metrics"], "run_id": run_id, "model_id": current_model})
            continue
        record = produced[name]
        run_id = tracking.attach(record["run_id"], parent, name)
        current_model = record.get("model_id")
        logged_models.log_datasets(run_id, record.get("datasets", []))  # a copy of a cached stage's run lacks them
        # the producing stage's own figures stay; the evaluation adds quality and ratios
        model_records.log_evaluation(run_id, evaluation, current_model)
        records.append({**record, "metrics": {**(evaluation or {}).get("metrics", {}), **record["metrics"]}, "run_id": run_id})
    results = {
        "recipe": {"name": recipe["name"], "hash": recipe_hash(recipe)},
        "tracking": {"parent_run_id": parent, "experiment": experiment, "register_as": recipe["tracking"].get("register_as") or recipe["name"],
                     **model_records.urls(parent, experiment)},
        "baseline": {"metrics": evals["baseline"]["metrics"], "run_id": baseline_run, "model_id": baseline_model},
        "stages": records,
    }
    publish_report(results, results_path, report_path, html_path, parent, report.earlier_points(results))
    if parent:
        final = records[-1]["metrics"] if records else results["baseline"]["metrics"]
        tracking.log_metrics(parent, {f"final.{k}": v for k, v in final.items()})
        tracking.log_metrics(parent, {f"baseline.{k}": v for k, v in results["baseline"]["metrics"].items()})
        models = [s for s in records if s.get("model_uri")]
        final_model = models[-1].get("model_id") if models else None
        model_records.log_parent(parent, [d for s in records for d in s.get("datasets", [])] + model_records.evaluation_datasets(evals), final_model)
        if models:
            tracking.register_model(results["tracking"]["register_as"], models[-1]["model_uri"], parent, models[-1]["metrics"], model=final_model)
        tracking.finish(parent)
    print(report.table(results), flush=True)


def publish_report(results: dict[str, Any], results_path: str, report_path: str, html_path: str | None, parent: str | None,
                   earlier: list[dict[str, Any]]) -> None:
    """Both report steps' common tail: write results.json, render the report (Markdown
    with its plots inline, HTML; ``earlier``: other runs' points the plot shows in grey)
    and, with a parent run, log results.json and every report file on it. The caller
    logs its own figures on the parent run and closes it."""
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    Path(results_path).write_text(json.dumps(results, indent=2))
    with tempfile.TemporaryDirectory() as tmp:
        written = report.write_report(results, tmp, earlier)
        # KFP's viewers cannot follow a relative link: the plots go inline
        inline = report.markdown(results, report.data_uri(written["plot"]), earlier)
        if "front" in written:  # a search's run: its section after the usual tables, as in report.md
            inline += search_report.markdown(results, report.data_uri(written["front"]))
        Path(report_path).write_text(inline)
        if html_path:
            Path(html_path).parent.mkdir(parents=True, exist_ok=True)
            Path(html_path).write_text(written["html"].read_text())
        if parent:
            log_named_artifact(parent, results_path, "results.json")
            for path in written.values():
                log_named_artifact(parent, str(path), path.name)


def log_named_artifact(run_id: str, path: str, name: str) -> None:
    """Log a file into ``run_id`` under a fixed name (KFP output paths end in the output's
    name); both report steps log results.json and the report files this way."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / name
        shutil.copyfile(path, target)
        tracking.log_artifact(run_id, target)
