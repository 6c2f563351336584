"""Credentials in a tracking URI never reach a terminal or a log, and the Model Registry
look-up is not a string built from the model's name (against a real `mlflow server`)."""

from __future__ import annotations

import io
import logging
from urllib.parse import urlsplit

import pytest
from conftest import run_cli
from llmpress.components import tracking
from llmpress.components.tracking.redaction import redacted
from llmpress.local import _ProgressFilter
from mlflow.tracking import MlflowClient

PASSWORD = "pw-9Vq-never-printed"


@pytest.fixture
def server_with_credentials(mlflow_server, monkeypatch, tmp_path):
    """The session's MLflow server, its URI carrying a user and password (basic auth)."""
    host = urlsplit(mlflow_server.url).netloc
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@{host}")
    tracking.use_spool(str(tmp_path / "spool"))
    return mlflow_server


@pytest.mark.parametrize(("text", "expected"), [
    ("http://alice:secret@mlflow:5000/api", "http://***@mlflow:5000/api"),
    ("MLflow at https://token@mlflow.example.com cannot be reached", "MLflow at https://***@mlflow.example.com cannot be reached"),
    ("https://h/p?a=1&access_token=xyz&b=2", "https://h/p?a=1&access_token=***&b=2"),
    ("s3://bucket/models/m?X-Amz-Signature=abc123", "s3://bucket/models/m?X-Amz-Signature=***"),
    ("sqlite:////runs/mlflow.db and s3://bucket/key@v2 stay", "sqlite:////runs/mlflow.db and s3://bucket/key@v2 stay"),
])
def test_credentials_in_a_uri_are_replaced(text, expected):
    assert redacted(text) == expected


def test_a_tracked_run_prints_no_credentials(server_with_credentials, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    parent = tracking.start_parent("t-redaction", "recipe-r", {"a": 1}, {})
    tracking.finish(parent)  # MLflow itself prints "View run ... at <URI>" here unless told not to
    out, err = capfd.readouterr()
    assert MlflowClient(server_with_credentials.url).get_run(parent).info.status == "FINISHED"
    assert PASSWORD not in out + err + caplog.text


def test_the_outage_warning_names_the_server_without_its_password(monkeypatch, tmp_path, caplog):
    from servers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}")
    tracking.use_spool(str(tmp_path / "spool"))
    with caplog.at_level(logging.WARNING, logger="llmpress"):
        tracking.start_parent("t-redaction", "recipe-r", {}, {})
    (warning,) = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert "http://***@127.0.0.1:" in warning and PASSWORD not in caplog.text


def test_sync_names_the_server_without_its_password(server_with_credentials, tmp_path):
    import os

    (tmp_path / "run" / "tracking-spool").mkdir(parents=True)
    result = run_cli("sync", str(tmp_path / "run"), env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert "into http://***@127.0.0.1:" in result.stdout and PASSWORD not in result.stdout + result.stderr


def test_the_run_log_and_the_terminal_get_no_credentials(tmp_path):
    terminal, log_file = io.StringIO(), io.StringIO()
    progress = _ProgressFilter(terminal, log_file, verbose=True)
    line = f"🏃 View run x at: http://alice:{PASSWORD}@mlflow:5000/#/experiments/1\n"
    assert progress.write(line) == len(line)
    assert PASSWORD not in terminal.getvalue() + log_file.getvalue() and "http://***@mlflow:5000" in log_file.getvalue()


def test_a_model_name_with_quotes_is_registered_once(server_with_credentials):
    name = "it's a \"model\""
    parent = tracking.start_parent("t-registry-quotes", "recipe-q", {}, {})
    record = {"op": "register", "id": "0" * 31 + "1", "run": parent, "name": name, "source": "s3://m/x", "tags": {}}
    client = MlflowClient(server_with_credentials.url)
    tracking.apply(tracking._client(), record, None)
    tracking.apply(tracking._client(), record, None)  # a replay of the same spooled record
    versions = [v for v in client.search_model_versions("tags.`llmpress.spool_id` = '" + record["id"] + "'")]
    assert [(v.name, v.source) for v in versions] == [(name, "s3://m/x")]


def test_a_spooled_registration_with_a_forged_id_is_not_put_into_a_filter(server_with_credentials):
    record = {"op": "register", "id": "x' OR name LIKE '%", "run": "r", "name": "m", "source": "s3://m/x", "tags": {}}
    with pytest.raises(ValueError, match="is not 32 hex digits"):
        tracking.apply(tracking._client(), record, None)
