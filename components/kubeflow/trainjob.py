"""Submitting a Kubeflow Trainer TrainJob and waiting for it, through the ``kubernetes``
client (component layer: the step's pod talks to the API server with its service
account). The manifest itself is built, and tested, in ``stages/distill_launch``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from llmpress.components.errors import UserError

log = logging.getLogger("llmpress")

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"


def current_namespace() -> str:
    """The pod's own namespace (in-cluster), else the kubeconfig's, else 'default'."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        from kubernetes import config

        try:
            _, context = config.list_kube_config_contexts()
            return context["context"].get("namespace", "default")
        except Exception:  # no kubeconfig at all
            return "default"


def _api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as err:
            allowed = f"a multi-node job needs a Kubernetes API server; none is configured ({type(err).__name__})"
            raise UserError.field("resources.nodes", ">1", allowed) from None
    return client.CustomObjectsApi()


def outcome(job: dict[str, Any]) -> str | None:
    """'Complete' or 'Failed' once the TrainJob has finished, else None."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"]
    return None


def submit_and_wait(manifest: dict[str, Any], poll_s: float = 20, timeout_s: float = 7 * 24 * 3600) -> dict[str, Any]:
    """Create the TrainJob (or adopt one of the same name left by an earlier attempt of
    this step: the workers resume from their checkpoints) and wait until it ends."""
    from kubernetes.client.exceptions import ApiException

    api = _api()
    namespace = manifest["metadata"].get("namespace") or current_namespace()
    name = manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        log.info("submitted TrainJob %s/%s (%d nodes)", namespace, name, manifest["spec"]["trainer"]["numNodes"])
    except ApiException as err:
        if err.status != 409:
            raise
        log.info("TrainJob %s/%s exists already: waiting for it", namespace, name)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        done = outcome(job)
        if done == "Complete":
            return job
        if done == "Failed":
            reasons = "; ".join(c.get("message", "") for c in job["status"]["conditions"] if c.get("type") == "Failed")
            raise RuntimeError(f"TrainJob {namespace}/{name} failed: {reasons}")
        time.sleep(poll_s)
    raise TimeoutError(f"TrainJob {namespace}/{name} did not finish in {timeout_s:.0f}s")
