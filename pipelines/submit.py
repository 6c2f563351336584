"""Talk to a Kubeflow Pipelines server: submit a run of a recipe, register a recipe's
pipeline (a new version per release), both idempotent where GitOps needs it.

Authentication follows the KFP SDK: a bearer token from a file (``--token-file``), or
the projected service-account token at ``$KF_PIPELINES_SA_TOKEN_PATH`` inside a
cluster; the token never appears in arguments, output or logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpress import __version__
from llmpress.components.errors import UserError

# KFP's filter operations (backend/api/v2beta1/filter.proto)
_EQUALS, _IS_SUBSTRING = 1, 9
FINISHED = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "ERROR"}


class ServerError(Exception):
    """The KFP server answered with an error we cannot blame on the user (exit 1)."""


@dataclass(frozen=True)
class Connection:
    """Where the KFP API is and how to authenticate; the token stays in a file."""

    host: str
    namespace: str | None = None
    token_file: Path | None = None
    ssl_ca_cert: Path | None = None

    @property
    def ui(self) -> str:
        return (os.environ.get("KF_PIPELINES_UI_ENDPOINT") or self.host).rstrip("/")


def check_host(conn: Connection, timeout: float = 5.0) -> None:
    """Fail fast with one line when the host cannot be reached: kfp.Client would retry
    its health check for half a minute and then raise a traceback-shaped error."""
    if not conn.host.startswith(("http://", "https://")):
        raise UserError.field("--host", conn.host, "a URL such as https://kubeflow.example.com/pipeline or http://localhost:8888")
    url = conn.host.rstrip("/") + "/apis/v2beta1/healthz"
    context = None
    if conn.ssl_ca_cert:
        import ssl

        context = ssl.create_default_context(cafile=str(conn.ssl_ca_cert))
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context):
            return
    except urllib.error.HTTPError:
        return  # it answered: auth proxies say 302/401/403 here, the real calls tell more
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError.field("--host", conn.host, f"cannot reach the Kubeflow Pipelines API ({reason})") from None


def connect(conn: Connection) -> Any:
    """A ``kfp.Client`` for ``conn`` after a fast reachability check."""
    for flag, path in (("--token-file", conn.token_file), ("--ssl-ca-cert", conn.ssl_ca_cert)):
        if path is not None and not path.is_file():
            raise UserError.field(flag, str(path), "file not found")
    check_host(conn)
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    kwargs: dict[str, Any] = {"host": conn.host, "ssl_ca_cert": str(conn.ssl_ca_cert) if conn.ssl_ca_cert else None}
    if conn.namespace:
        kwargs["namespace"] = conn.namespace
    if conn.token_file:
        kwargs["existing_token"] = conn.token_file.read_text().strip()
    elif os.environ.get("KF_PIPELINES_SA_TOKEN_PATH"):
        # kfp.Client uses the projected token only when it finds the host itself; with
        # an explicit host (the chart's Jobs) it has to be handed over.
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(os.environ["KF_PIPELINES_SA_TOKEN_PATH"])
    with _quiet():
        return kfp.Client(**kwargs)


@contextlib.contextmanager
def _quiet() -> Any:
    """kfp.Client prints links and warnings of its own; ours are the ones that count."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _api(action: str) -> Any:
    """Turn the KFP API's exceptions into one line: auth problems are the user's (exit 2)."""
    import kfp_server_api

    try:
        yield
    except kfp_server_api.ApiException as err:
        if err.status in (401, 403):
            raise UserError(f"--token-file: {action} refused ({err.status} {err.reason}) — pass a valid token file or set KF_PIPELINES_SA_TOKEN_PATH") from None
        raise ServerError(f"{action}: the KFP API answered {err.status} {err.reason}: {_message(err)}") from None
    except OSError as err:  # urllib3 wraps connection drops in OSError subclasses
        raise ServerError(f"{action}: connection to the KFP API failed ({err})") from None


def _message(err: Any) -> str:
    try:
        return str(json.loads(err.body).get("message", ""))[:200]
    except (TypeError, ValueError, AttributeError):
        return str(err.body or "")[:200]


def run_key(recipe: Any) -> str:
    """A key that changes exactly when what the run would do changes: the validated
    recipe (defaults filled in) and the llmpress version that compiles it."""
    canonical = json.dumps({"recipe": recipe.model_dump(mode="json"), "llmpress": __version__}, sort_keys=True)
    return "k" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _filter(key: str, value: str, operation: int = _EQUALS) -> str:
    return json.dumps({"predicates": [{"operation": operation, "key": key, "stringValue": value}]})


@dataclass(frozen=True)
class Submitted:
    run_id: str
    url: str
    name: str
    created: bool
    state: str | None = None


def submit(recipe: Any, conn: Connection, experiment: str | None = None, revision: str | None = None,
           service_account: str | None = None, wait: bool = False, timeout: int = 86400, values: dict[str, Any] | None = None) -> Submitted:
    """Start a run of ``recipe`` with run parameters ``values`` (``--set``; the others keep
    the recipe's values). With ``revision`` (GitOps) it runs at most once per effective
    recipe: a run whose name holds the same key means "already submitted"."""
    from llmpress.parameters import effective_recipe
    from llmpress.pipeline import compile_recipe

    values = values or {}
    effective = effective_recipe(recipe, values)  # a bad value is one line here, before the server is asked
    client = connect(conn)
    experiment = experiment or effective.tracking.experiment
    key = run_key(effective)
    if revision:
        name = f"{recipe.name} {key} @{revision[:12]}"
    else:
        name = f"{recipe.name} {time.strftime('%Y%m%d-%H%M%S')}"
    with _api("experiment"), _quiet():
        exp = client.create_experiment(experiment, namespace=conn.namespace)
    if revision:
        with _api("list runs"):
            found = client.list_runs(experiment_id=exp.experiment_id, namespace=conn.namespace, filter=_filter("display_name", key, _IS_SUBSTRING))
        if found.runs:
            run = found.runs[0]
            return Submitted(run.run_id, f"{conn.ui}/#/runs/details/{run.run_id}", run.display_name, created=False, state=str(run.state))
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_recipe(recipe, Path(tmp) / f"{recipe.name}.yaml")
        with _api("create run"), _quiet():
            run = client.run_pipeline(experiment_id=exp.experiment_id, job_name=name, pipeline_package_path=str(package), params=values,
                                      service_account=service_account)
    state = None
    if wait:
        with _api("wait for run"):
            try:
                state = str(client.wait_for_run_completion(run.run_id, timeout=timeout, sleep_duration=10).state)
            except TimeoutError:
                raise ServerError(f"run {run.run_id} still not finished after {timeout} s") from None
    return Submitted(run.run_id, f"{conn.ui}/#/runs/details/{run.run_id}", name, created=True, state=state)


@dataclass(frozen=True)
class Registered:
    pipeline_id: str
    version_id: str | None
    version: str
    url: str
    created: bool


def register(recipe: Any, conn: Connection, version: str) -> Registered:
    """Upload ``recipe``'s pipeline (named after the recipe) as version ``<name>-<version>``;
    an existing version of that name is left alone, so re-running the Job is harmless."""
    from llmpress.pipeline import compile_recipe

    client = connect(conn)
    version_name = f"{recipe.name}-{version}"
    with tempfile.TemporaryDirectory() as tmp:
        package = str(compile_recipe(recipe, Path(tmp) / f"{recipe.name}.yaml"))
        with _api("find pipeline"):
            pipeline_id = client.get_pipeline_id(recipe.name)
        if pipeline_id is None:
            with _api("upload pipeline"), _quiet():
                made_p = client.upload_pipeline(package, pipeline_name=recipe.name, description=recipe.description or None, namespace=conn.namespace)
            pipeline_id = made_p.pipeline_id
        with _api("list pipeline versions"):
            versions = client.list_pipeline_versions(pipeline_id, filter=_filter("display_name", version_name)).pipeline_versions or []
        url = f"{conn.ui}/#/pipelines/details/{pipeline_id}"
        if versions:
            return Registered(pipeline_id, versions[0].pipeline_version_id, version_name, url, created=False)
        with _api("upload pipeline version"), _quiet():
            made = client.upload_pipeline_version(package, pipeline_version_name=version_name, pipeline_id=pipeline_id, description=f"llmpress {__version__}")
    return Registered(pipeline_id, made.pipeline_version_id, version_name, f"{url}/version/{made.pipeline_version_id}", created=True)


# --- the CLI's submit and register commands -------------------------------------------

def add_commands(sub: Any) -> None:
    """``llmpress submit`` and ``llmpress register`` on the CLI's subparsers."""
    p = sub.add_parser("submit", help="start a run of a recipe on Kubeflow Pipelines; prints the run URL")
    p.add_argument("recipe")
    _connection_args(p)
    p.add_argument("--experiment", help="KFP experiment (default: the recipe's tracking.experiment)")
    p.add_argument("--revision", help="git revision (GitOps): at most one run per recipe content; a rerun prints the existing run")
    p.add_argument("--service-account", help="Kubernetes service account of the run's pods (default: KFP's pipeline-runner)")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=int, default=86400, help="seconds --wait waits (default 86400)")
    from llmpress.cli import add_set_argument

    add_set_argument(p)

    p = sub.add_parser("register", help="upload recipes' pipelines to Kubeflow Pipelines as version <name>-<version>")
    p.add_argument("recipes", nargs="+")
    _connection_args(p)
    p.add_argument("--version", dest="pipeline_version", default=__version__, help=f"version label (default: {__version__})")


def _connection_args(p: Any) -> None:
    p.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"), help="KFP API URL (default: $KF_PIPELINES_ENDPOINT)")
    p.add_argument("--namespace", help="KFP profile namespace (multi-user Kubeflow)")
    p.add_argument("--token-file", type=Path, help="file holding a bearer token (default: $KF_PIPELINES_SA_TOKEN_PATH in a pod)")
    p.add_argument("--ssl-ca-cert", type=Path, help="CA bundle for a private TLS certificate")
    p.add_argument("--defaults", type=Path, help="cluster defaults (secret names, per-kind resources): the chart's defaults.yaml")


def run_command(args: Any) -> int:
    """Run ``submit`` or ``register``; a server-side failure is one line and exit 1."""
    import sys

    from llmpress.cluster import load_recipe_with_defaults

    if not args.host:
        raise UserError("--host: missing — give the KFP API URL or set KF_PIPELINES_ENDPOINT")
    conn = Connection(args.host, args.namespace, args.token_file, args.ssl_ca_cert)
    try:
        if args.command == "submit":
            recipe = load_recipe_with_defaults(args.recipe, args.defaults)
            from llmpress.parameters import parse_sets

            values = parse_sets(recipe, args.set, args.parameters)
            done = submit(recipe, conn, args.experiment, args.revision, args.service_account, args.wait, args.timeout, values)
            if done.created:
                print(f"submitted: {done.name}\n{done.url}")
            else:  # a resync: the run this recipe content already has
                print(f"already submitted: {done.name} ({done.state})\n{done.url}")
            if done.created and done.state:
                print(f"state: {done.state}")
            return 0 if not args.wait or done.state == "SUCCEEDED" else 1
        recipes = [load_recipe_with_defaults(path, args.defaults) for path in args.recipes]
        version = args.pipeline_version
        from llmpress.cluster import check_version_label

        check_version_label(version)
        for recipe in recipes:
            done_r = register(recipe, conn, version)
            print(f"{'registered' if done_r.created else 'already registered'}: {done_r.version}\n{done_r.url}")
        return 0
    except ServerError as err:
        print(f"llmpress: error: {err}", file=sys.stderr)
        return 1
