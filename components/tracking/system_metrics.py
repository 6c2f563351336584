"""System metrics of a stage's run: CPU, memory, disk, network, and each GPU's
utilisation and memory where the hardware reports them (NVIDIA through NVML, AMD
through ROCm SMI).

This is MLflow's own system-metrics monitor (``mlflow.system_metrics``: its collectors,
its ``system/…`` metric names, its ``MLFLOW_SYSTEM_METRICS_*`` settings) with two
changes: points go through llmpress's tracking, so they are spooled while MLflow is
down instead of ending the monitor at the first failed call (MLflow's loop asks the
server on every sample whether the run is still running), and the stage's end
publishes what was sampled since the last point, so a stage shorter than the interval
still gets one point covering all of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llmpress.components import tracking

INTERVAL_S = 5.0  # MLflow's default is 10 s; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides either


class _SpoolingLogger:
    """What MLflow's monitor publishes through (in place of its BatchMetricsLogger)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.data: list[Any] = []  # MLflow's monitor reads its length when it logs at debug level
        self.total_training_time = self.total_log_batch_time = 0.0

    def record_metrics(self, metrics: dict[str, float], step: int) -> None:
        tracking.log_metrics(self.run_id, metrics, step=step)

    def flush(self) -> None:
        return None  # each point was handed to tracking when it was published


def _monitor_type() -> Any:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class SpoolingSystemMetricsMonitor(SystemMetricsMonitor):
        def __init__(self, run_id: str) -> None:
            super().__init__(run_id, sampling_interval=INTERVAL_S, samples_before_logging=1, tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))
            self.mlflow_logger = _SpoolingLogger(run_id)

        def monitor(self) -> None:
            self.collect_metrics()  # psutil's CPU figure is "since the last call": the first one primes it
            for monitor in self.monitors:
                monitor.clear_metrics()
            while not self._shutdown_event.wait(self.sampling_interval):
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())

        def finish(self) -> None:
            if self._process is None:
                return
            self._shutdown_event.set()
            self._process.join()
            self._process = None
            self.collect_metrics()  # the time since the last point
            self.publish_metrics(self.aggregate_metrics())

    return SpoolingSystemMetricsMonitor


@contextmanager
def recording(run_id: str | None) -> Iterator[None]:
    """Sample system metrics into run ``run_id`` while the block runs (nothing without a run)."""
    if not run_id:
        yield
        return
    monitor = _monitor_type()(run_id)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
