"""bitsandbytes schemes of the quantize stage: LLM.int8() and 4-bit NF4/FP4.

bitsandbytes quantizes while ``transformers`` loads the weights, one shard at a time, so
the 16-bit model never has to fit on the device; ``save_pretrained`` then writes a
serialized bitsandbytes checkpoint (int8 weights with per-row scales, or packed 4-bit
weights with per-block absmax) whose ``quantization_config`` lets plain
``transformers`` reload it. bitsandbytes 0.50 runs all three on the CPU too (its CPU
backend has int8 and 4-bit matmuls), which is what the tests use.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SCHEMES = ("int8", "nf4", "fp4")


def quantization_config(scheme: str, skip: list[str], compute_dtype: Any, int8_threshold: float = 6.0, double_quant: bool = True) -> Any:
    """The ``BitsAndBytesConfig`` for ``scheme``; ``skip`` holds exact module names kept 16-bit."""
    from transformers import BitsAndBytesConfig

    # transformers matches skip entries as regexes and prefixes; anchored escapes keep
    # "mlp.gate" from also keeping "mlp.gate_proj"
    exact = [re.escape(name) + "$" for name in skip]
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold, llm_int8_skip_modules=exact)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=exact,
    )


def load_quantized(model_dir: str | Path, scheme: str, skip: list[str], device: str, int8_threshold: float = 6.0, double_quant: bool = True) -> tuple[Any, Any]:
    """(quantized model, tokenizer): the model at ``model_dir`` loaded through bitsandbytes."""
    import torch
    from llmpress.components.models.io import check_model_dir
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(model_dir)
    dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None) or torch.float32
    config = quantization_config(scheme, skip, dtype, int8_threshold, double_quant)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype="auto", use_safetensors=True,
        device_map={"": 0} if device == "cuda" else "cpu",
    )
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def skeleton(model_dir: str | Path) -> Any:
    """The model's module tree with no weights (meta tensors): names and shapes only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
