"""Credentials out of every URI llmpress prints or logs: one function, used by the
tracking code, the CLI and the local runner's log (docs/artifacts.md)."""

from __future__ import annotations

import re

# scheme://user:password@host or scheme://token@host: the whole user part goes
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"<>]+@")
# ?token=…, &password=…, X-Amz-Signature=… in a query string
_SECRET_PARAMETER = re.compile(r"(?P<name>[?&;](?:[A-Za-z0-9_-]*(?:token|password|passwd|secret|signature|credential|key)[A-Za-z0-9_-]*)=)[^&\s'\"<>#]+",
                               re.IGNORECASE)


def redacted(text: str) -> str:
    """``text`` with the user part of every URI and every secret-looking query value
    replaced by ``***``: ``http://alice:pw@mlflow:5000`` → ``http://***@mlflow:5000``."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _SECRET_PARAMETER.sub(r"\g<name>***", text)
