"""llmpress: compress LLMs with Kubeflow Pipelines v2 — recipe → pipeline → stages."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmpress")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
