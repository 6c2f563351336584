"""The one entry point: ``llmpress validate | run | compile | report``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from llmpress import __version__, submit
from llmpress.components.errors import UserError
from llmpress.components.tracking.redaction import redacted

EXIT_USER = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 — never usage spam
        print(f"llmpress: error: {message} (see llmpress {self.prog.split()[-1] if ' ' in self.prog else ''} --help)".replace("  ", " "), file=sys.stderr)
        sys.exit(EXIT_USER)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmpress", description="Compress LLMs with Kubeflow Pipelines v2.")
    parser.add_argument("--version", action="version", version=f"llmpress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("validate", help="check a recipe; prints ok or one line per problem")
    p.add_argument("recipe")
    add_set_argument(p)

    p = sub.add_parser("run", help="run a recipe locally (kfp.local, local artifacts, sqlite MLflow)")
    p.add_argument("recipe")
    p.add_argument("--out", type=Path, help="run folder (default: <storage.root>/<recipe name>)")
    p.add_argument("-v", "--verbose", action="store_true", help="show every line of every step (always in <out>/run.log)")
    p.add_argument("--no-cache", action="store_true", help="run every step again (default: reuse steps whose inputs are unchanged)")
    add_set_argument(p)

    p = sub.add_parser("sync", help="replay MLflow records spooled while the tracking server was unreachable")
    p.add_argument("spool", metavar="RUN_DIR|SPOOL", help="a local run folder, a spool folder, or an s3:// spool prefix")

    p = sub.add_parser("compile", help="compile a recipe to Kubeflow Pipelines IR YAML")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", type=Path, required=True, help="YAML file to write")
    p.add_argument("--k8s", action="store_true", help="write Kubeflow's Kubernetes-native Pipeline + PipelineVersion resources instead")
    p.add_argument("--version", dest="pipeline_version", default=__version__, help="with --k8s: the PipelineVersion's version label")
    p.add_argument("--namespace", help="with --k8s: metadata.namespace of the resources")
    p.add_argument("--defaults", type=Path, help="cluster defaults (secret names, per-kind resources): the chart's defaults.yaml")

    p = sub.add_parser("report", help="print the results table of a finished run and write report.md, report.html and the plot")
    p.add_argument("run_dir", metavar="RUN_DIR|MLFLOW_RUN_ID", help="a finished run folder, or an MLflow run id (looked up in MLFLOW_TRACKING_URI)")
    p.add_argument("--out", type=Path, help="where to write the report of an MLflow run (default: ./report-<run id>)")
    submit.add_commands(sub)
    return parser


def add_set_argument(p: argparse.ArgumentParser) -> None:
    """``--set`` and ``--parameters``: run parameters, as the Kubeflow UI's run form sets them."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run parameter (gptq_group_size=64, or STAGE.FIELD / recipe field: gptq.group_size=64, "
                        "data.calibration.num_samples=32); repeatable; `llmpress compile` lists them in the pipeline's inputs")
    p.add_argument("--parameters", type=Path, metavar="FILE", help="run parameters from a YAML mapping (KEY: VALUE); --set wins")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as err:
        for line in err.problems:
            print(f"llmpress: error: {redacted(line)}", file=sys.stderr)
        return EXIT_USER


def _dispatch(args: argparse.Namespace) -> int:
    from llmpress.components import report
    from llmpress.recipe import load_recipe

    if args.command == "report":
        results, folder = _finished_run(args.run_dir, args.out)
        try:
            text = report.table(results)
        except (KeyError, TypeError, AttributeError):
            raise UserError.field("run_dir", args.run_dir, "not an llmpress results.json") from None
        paths = report.write_report(results, folder)
        print(text)
        print(f"\nreport: {paths['markdown']}\n        {paths['html']}\nplot:   {paths['plot']}")
        return 0

    if args.command in ("submit", "register"):
        return submit.run_command(args)
    if args.command == "sync":
        return _sync(args.spool)
    if args.command == "compile" and args.defaults:
        from llmpress.cluster import load_recipe_with_defaults

        recipe = load_recipe_with_defaults(args.recipe, args.defaults)
    else:
        recipe = load_recipe(args.recipe)
    if args.command in ("validate", "run"):
        from llmpress.parameters import effective_recipe, parse_sets

        values = parse_sets(recipe, args.set, args.parameters)
        recipe_in_effect = effective_recipe(recipe, values)  # one line per problem, before anything starts
    if args.command == "validate":
        from llmpress.local import preflight

        preflight(recipe_in_effect)  # local model and data paths, builtins: what `run` would refuse
        print("ok")
        return 0
    if args.command == "compile":
        from llmpress.pipeline import compile_recipe

        if not args.k8s:
            print(compile_recipe(recipe, args.output))
            return 0
        import tempfile

        from llmpress import cluster

        cluster.check_version_label(args.pipeline_version)
        with tempfile.TemporaryDirectory() as tmp:
            ir = compile_recipe(recipe, Path(tmp) / "pipeline.yaml")
            print(cluster.write_resources(cluster.pipeline_resources(ir, args.pipeline_version, args.namespace), args.output))
        return 0
    # run
    from llmpress.local import StageFailed, default_out_dir, run_local

    out_dir = args.out or default_out_dir(recipe)
    from llmpress.components.tracking import git_revision

    revision = git_revision(args.recipe)  # the steps tag the parent run with it
    if revision:
        os.environ["LLMPRESS_GIT_REVISION"] = revision
    try:
        results = run_local(recipe, out_dir, verbose=args.verbose, cache=not args.no_cache, values=values)
    except StageFailed as err:
        print(f"llmpress: error: {err}", file=sys.stderr)
        return EXIT_USER if err.user_error else 1
    print()
    print(report.table(results))
    print(f"\nresults: {out_dir / 'results.json'}\nreport:  {out_dir / 'report.md'}")
    where = results.get("tracking", {}).get("mlflow_experiment_url")
    if where:  # what to open in MLflow (a local database needs `mlflow ui` first)
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        print(f"mlflow:  {where}" + (f"\n         (mlflow ui --backend-store-uri {uri})" if uri.startswith("sqlite:") else ""))
    if "search" in results:
        return _search_outcome(results["search"], out_dir)
    return 0


def _search_outcome(search: dict, out_dir: Path) -> int:
    """The search's verdict: the winner and its recipe file (exit 0), or which constraint
    the closest candidate missed and by how much (exit 1)."""
    from llmpress.components.kubeflow.search_steps import verdict_line
    from llmpress.local import WINNER_RECIPE

    print(verdict_line(search))
    if search["winner"]:
        print(f"winner recipe: {out_dir / WINNER_RECIPE}")
        return 0
    print(f"llmpress: search: nothing meets the budget; closest {search['closest']}: {'; '.join(search['failed'])}", file=sys.stderr)
    return 1


def _sync(where: str) -> int:
    """``llmpress sync``: replay a spool into MLFLOW_TRACKING_URI (a local run folder's
    own mlflow.db when unset)."""
    from llmpress.components import tracking
    from llmpress.components.tracking import spool as tracking_spool

    spool = where
    if not where.startswith("s3://") and (Path(where) / "tracking-spool").is_dir():
        spool = str(Path(where) / "tracking-spool")
        if (Path(where) / "mlflow.db").is_file():
            os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(Path(where) / 'mlflow.db').resolve()}")
    if not where.startswith("s3://") and not Path(spool).is_dir():
        raise UserError.field("spool", where, "no such folder; pass a run folder, its tracking-spool folder or an s3:// spool")
    if not tracking.enabled():
        raise UserError.field("MLFLOW_TRACKING_URI", "", "set it to the tracking server to replay into")
    waiting = tracking_spool.pending(spool)
    try:
        applied = tracking.sync(spool)
    except UserError:  # a record that is not what llmpress writes: one line, exit 2, the rest stay
        raise
    except Exception as err:  # the server is still away: nothing is lost, the records stay
        print(f"llmpress: error: replayed {waiting - tracking_spool.pending(spool)} of {waiting} records; "
              f"MLflow failed ({type(err).__name__}: {str(err)[:160]}); run sync again", file=sys.stderr)
        return 1
    print(f"replayed {applied} records from {spool} into {redacted(os.environ['MLFLOW_TRACKING_URI'])}")
    return 0


def _finished_run(where: str, out: Path | None) -> tuple[dict, Path]:
    """(results, folder to write the report in) of a run folder or an MLflow run id."""
    import os
    import re

    from llmpress.components import tracking

    folder = Path(where)
    if (folder / "results.json").is_file():
        if (folder / "mlflow.db").is_file():  # a local run's own tracking: earlier runs for the plot
            os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(folder / 'mlflow.db').resolve()}")
        try:
            return json.loads((folder / "results.json").read_text()), folder
        except json.JSONDecodeError:
            raise UserError.field("run_dir", str(folder / "results.json"), "not an llmpress results.json") from None
    if not re.fullmatch(r"[0-9a-f]{32}", where):
        raise UserError.field("run_dir", where, "no results.json there; pass the folder of a finished llmpress run or an MLflow run id (32 hex digits)")
    if not tracking.enabled():
        raise UserError.field("run_dir", where, "an MLflow run id is looked up in MLFLOW_TRACKING_URI, which is not set")
    try:
        results = tracking.run_results(where)
    except Exception as err:  # unknown run, no results.json logged, server unreachable
        raise UserError.field("run_dir", where, f"no llmpress results.json on that MLflow run or its parent ({type(err).__name__})") from None
    return results, out or Path(f"report-{where[:8]}")


if __name__ == "__main__":
    sys.exit(main())
