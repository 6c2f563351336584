"""Model I/O: the one loader and saver for models (Hugging Face format, safetensors only)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

from llmpress.components.errors import UserError
from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
WEIGHT_SUFFIX = ".safetensors"


class ModelSpec(BaseModel):
    """Which model to start from."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="local dir or .gguf file, s3://bucket/prefix (or s3://…/FILE.gguf), hf:ORG/NAME (or ORG/NAME), or builtin:NAME")
    revision: str | None = Field(None, description="git revision on the hub (hf sources)")
    dtype: Dtype = Field("auto", description="dtype the stages load the model in")
    trust_remote_code: bool = Field(False, description="run code shipped with the model (opt-in only)")

    def kind(self) -> str:
        """'builtin', 's3', 'local' or 'hf'."""
        if self.source.startswith("builtin:"):
            return "builtin"
        if self.source.startswith("s3://"):
            return "s3"
        if self.source.startswith(("/", "./", "../", "~")) or Path(self.source).exists():
            return "local"
        return "hf"


def weight_files(model_dir: str | Path) -> list[Path]:
    return sorted(Path(model_dir).glob(f"*{WEIGHT_SUFFIX}"))


def weights_size_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files: what a model costs on disk, tokenizer excluded."""
    return sum(p.stat().st_size for p in weight_files(model_dir))


# A model's config.json is a few KB; anything far larger is not one (files are hostile).
CONFIG_LIMIT_BYTES = 4 * 2**20


def read_config(model_dir: str | Path, field: str = "model.source") -> dict[str, Any]:
    """The model's config.json as a dict; one UserError if it is too large, not JSON, or
    not an object."""
    path = Path(model_dir) / "config.json"
    size = path.stat().st_size
    if size > CONFIG_LIMIT_BYTES:
        raise UserError.field(field, str(model_dir), f"config.json is {size} bytes; at most {CONFIG_LIMIT_BYTES} are read (a model's is a few KB)")
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UserError.field(field, str(model_dir), "config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise UserError.field(field, str(model_dir), f"config.json holds a JSON {type(config).__name__}, not an object")
    return config


def loaded_bytes(model_dir: str | Path, field: str = "model.source") -> int:
    """Bytes the weights take once transformers has loaded them (in the checkpoint's dtype).
    A compressed-tensors checkpoint (llm-compressor's output) is decompressed when it
    loads: its dense matrices in the model's 16-bit dtype, 3.5 times a W4A16 file's
    size; any other loads as stored (bitsandbytes' stays quantized)."""
    from safetensors import SafetensorError, safe_open

    path = check_model_dir(model_dir, field)
    config = read_config(path, field)
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "compressed-tensors":
        return weights_size_bytes(path)
    itemsize = 4 if str(config.get("dtype") or config.get("torch_dtype")) == "float32" else 2
    dense = 0
    for file in weight_files(path):
        try:
            with safe_open(file, "pt") as tensors:
                names = set(tensors.keys())
                for name in names:
                    shape_name = name.removesuffix("_packed") + "_shape"
                    # the packed matrix's (rows, columns); read only if it is that small
                    if name.endswith("weight_packed") and shape_name in names and tensors.get_slice(shape_name).get_shape() == [2]:
                        dense += math.prod(int(n) for n in tensors.get_tensor(shape_name).tolist())
                    elif not name.endswith(_OVERHEAD_SUFFIXES):
                        dense += math.prod(tensors.get_slice(name).get_shape())
        except SafetensorError as err:
            raise UserError.field(field, str(model_dir), f"{file.name} is not a readable safetensors file ({err})") from None
    return dense * itemsize


def check_model_dir(model_dir: str | Path, field: str = "model.source") -> Path:
    """A usable model directory has config.json and safetensors weights (never pickles)."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UserError.field(field, str(model_dir), "no such model directory")
    if not (path / "config.json").is_file():
        raise UserError.field(field, str(model_dir), "not a Hugging Face model directory (config.json missing)")
    if not weight_files(path):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f"found only pickled weights ({', '.join(pickles[:3])}); convert to safetensors" if pickles else "no weight files"
        raise UserError.field(field, str(model_dir), f"safetensors weights required: {hint}")
    return path


def check_source(spec: ModelSpec, field: str = "model") -> None:
    """Refuse a local or builtin model that cannot be used, without loading it."""
    from llmpress.components.models import gguf

    if spec.kind() == "local":
        if gguf.is_gguf(spec.source):
            gguf.check_gguf_file(spec.source, f"{field}.source")
        else:
            check_model_dir(spec.source, f"{field}.source")
    elif spec.kind() == "builtin":
        from llmpress.components.models.builtin import check_builtin_name

        name = spec.source.removeprefix("builtin:")
        check_builtin_name(name, f"{field}.source")
        if name in gguf.PACKAGED:
            gguf.packaged_file(name, f"{field}.source")


def fetch_model(spec: ModelSpec, dest: str | Path) -> Path:
    """Materialize a local, hub or builtin model as a safetensors directory at ``dest``
    (a GGUF file is converted once, cached by content)."""
    from llmpress.components.models import gguf

    dest = Path(dest)
    kind = spec.kind()
    if kind == "builtin":
        from llmpress.components.models.builtin import build_builtin

        src = build_builtin(spec.source.removeprefix("builtin:"))
    elif kind == "local" and gguf.is_gguf(spec.source):
        src = gguf.convert_gguf(spec.source)
    elif kind == "local":
        src = check_model_dir(spec.source)
    elif kind == "hf":
        src = _snapshot(spec)
    else:
        raise UserError.field("model.source", spec.source, "s3:// models are downloaded by the component layer")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth", ".git*"))
    return dest


def _snapshot(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download

    repo = spec.source.removeprefix("hf:")
    try:
        path = snapshot_download(repo, revision=spec.revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as err:  # offline, unknown repo, gated: all user-fixable
        raise UserError.field("model.source", spec.source, f"not a local directory and not loadable from the Hugging Face hub ({type(err).__name__})") from None
    return check_model_dir(path)


def torch_dtype(dtype: str) -> Any:
    import torch

    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a safetensors directory, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.to(device).eval()
    return model, tokenizer


def save_model(model: Any, tokenizer: Any, dest: str | Path, **save_kwargs: Any) -> Path:
    """Write a model directory with safetensors weights and its tokenizer."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(dest)
    return dest


def pick_device(requested: str = "auto") -> str:
    """The device a stage's ``device`` setting names: 'auto' is the GPU when one is
    visible; 'cuda' without one is a UserError before anything is loaded."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError.field("device", "cuda", "no CUDA device is visible to this step; use device: auto or cpu, or give the step a GPU")
    return requested


def free_memory(device: str) -> None:
    """Free the models the caller has dropped before it loads another: ``del`` alone
    does not (the first model a process loads stayed alive after ``del`` in a reference
    cycle until the collector ran, seen on the tiny Llama), and on a GPU the freed blocks
    go back to the device."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# Quantization bookkeeping (scales, zero points, activation order), not model parameters.
_OVERHEAD_SUFFIXES = ("_scale", "_zero_point", "_g_idx", "_global_scale", "_shape")


def count_parameters(model: Any) -> int:
    """Logical parameter count, the same for a model before and after quantization:
    packed low-bit weights count as the dense matrix they encode; scales do not count."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or name.endswith(_OVERHEAD_SUFFIXES):
                continue
            seen.add(id(param))
            # compressed-tensors packs int4 into int32; bitsandbytes packs 4-bit pairs into uint8
            if name == "weight_packed" or type(param).__name__ == "Params4bit":
                total += module.in_features * module.out_features
            else:
                total += param.numel()
    return total
