"""YAML from outside (a recipe, the chart's defaults), read so that no input can cost more
than a fraction of a second or a few MB, or mean something other than what it says.

Refused, each as one line: a file over ``MAX_BYTES``; nesting deeper than ``MAX_DEPTH``
or more than ``MAX_NODES`` values, both counted with aliases expanded (an alias bomb
turns a kilobyte into gigabytes; anchors for a repeated node selector stay fine); a
key given twice in one mapping
(YAML's "last one wins" would silently drop the first). Bounds are checked on libyaml's
event stream, which is not recursive, before anything is built. Numbers are read as
YAML 1.2 reads them, so ``1e-4`` is a float, not the string YAML 1.1 makes of it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from llmpress.components.errors import UserError

MAX_BYTES = 256 * 1024  # the largest recipe in recipes/ is ~3 KB
MAX_DEPTH = 32
MAX_NODES = 10_000  # a real recipe has ~100; building 10,000 takes ~0.3 s on a busy 2-core machine

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built with it: 10x faster
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


class _StrictLoader(_Loader):  # type: ignore[misc, valid-type]
    """The safe loader, refusing duplicate keys."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key: SafeConstructor refuses it with its own message
            if duplicate:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats (1e-4, 5E3): YAML 1.1's resolver wants a dot and reads "1e-4" as a string
_StrictLoader.yaml_implicit_resolvers = {k: list(v) for k, v in _Loader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load(path: Path, what: str) -> Any:
    """The YAML document in ``path`` as plain data, or one ``UserError`` line that names
    ``what`` (the field or flag the file came from), the file and the problem."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UserError(f"{what}: {str(path)!r} — {size} bytes, more than the {MAX_BYTES} a recipe may have")
    try:
        text = path.read_bytes()[: MAX_BYTES + 1].decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what}: {str(path)!r} — not a UTF-8 text file") from None
    return loads(text, f"{what}: {str(path)!r}")


def loads(text: str, where: str) -> Any:
    """``load`` for text already read; ``where`` starts each refusal."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise UserError(f"{where} — more than the {MAX_BYTES} bytes a recipe may have")
    try:
        _check_events(text, where)
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or "invalid YAML").split())
        raise UserError(f"{where} — not valid YAML{at}: {problem}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as err:  # a constructor's own failure (a bad timestamp, ...)
        raise UserError(f"{where} — not valid YAML: {str(err)[:80] or type(err).__name__}") from None


def _check_events(text: str, where: str) -> None:
    """Count values and depth as they would be after aliases are expanded: each alias
    adds the size and depth of what its anchor names, so a bomb stops at the cap."""
    nodes = 0
    frames: list[list[Any]] = []  # open collections: [anchor, nodes at start, deepest depth below]
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (values, depth) of the node it names

    def count(event: Any, values: int, depth: int) -> None:
        nonlocal nodes
        nodes += values
        if nodes > MAX_NODES:
            raise _refusal(where, event, f"more than {MAX_NODES} values (aliases counted expanded)")
        if len(frames) + depth > MAX_DEPTH:
            raise _refusal(where, event, f"nested deeper than {MAX_DEPTH} levels")
        for level, frame in enumerate(reversed(frames)):
            frame[2] = max(frame[2], depth + level + 1)

    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.DocumentStartEvent) and nodes:
            raise _refusal(where, event, "more than one YAML document; a recipe is one")
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                raise _refusal(where, event, f"alias *{event.anchor} names no complete node before it")
            count(event, *sizes[event.anchor])
        elif isinstance(event, yaml.ScalarEvent):
            count(event, 1, 0)
            if event.anchor:
                sizes[event.anchor] = (1, 0)
        elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            count(event, 1, 1)
            frames.append([event.anchor, nodes - 1, 1])
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            anchor, start, depth = frames.pop()
            if anchor:
                sizes[anchor] = (nodes - start, depth)


def _refusal(where: str, event: Any, problem: str) -> UserError:
    mark = event.start_mark
    return UserError(f"{where} — {problem} (line {mark.line + 1}, column {mark.column + 1})")
