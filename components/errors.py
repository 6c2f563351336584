"""The one error type for user mistakes. The CLI prints it as one line and exits 2."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A mistake the user can fix: a bad recipe field, CLI flag, file or artifact.

    ``problems`` holds one line per problem (``field: value — what is allowed``).
    """

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))

    @classmethod
    def field(cls, field: str, value: Any, allowed: str) -> UserError:
        """A single-field problem, phrased the same way everywhere."""
        return cls(f"{field}: {short(value)} — {allowed}")


def short(value: Any, limit: int = 240) -> str:
    """repr() of a value, cut in the middle so that one problem stays one readable line
    while both ends stay: a path's folder and its file name, a long key's start and end.
    The limit is one a real path rarely reaches (a pytest or CI temporary folder is
    100-150 characters); what comes from outside is bounded however long it is."""
    text = repr(value)
    if len(text) <= limit:
        return text
    head = (limit - 3) // 2
    return text[:head] + "..." + text[len(text) - (limit - 3 - head):]
