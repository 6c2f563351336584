"""Fine-tuning a compressed model inside the distill stage family.

``qlora``: the base model loaded in 4-bit NF4 (bitsandbytes) and frozen, LoRA adapters
trained on top (peft); saved merged into a dense model, the adapters beside it.
bitsandbytes' 4-bit kernels need CUDA, so on a CPU this refuses with one line.

``qat``: quantization-aware training before the quantize stage. Every Linear layer
(lm_head excluded) sees its weight fake-quantized to the grid the quantize stage will
use (symmetric, ``bits`` bits, ``group_size`` weights per scale); gradients pass the
rounding straight through. The saved weights are the fake-quantized ones, already on
that grid, so quantizing them afterwards adds little error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from llmpress.components.errors import UserError
from llmpress.components.models.quant_grid import GroupSize
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("llmpress")


class LoraSpec(BaseModel):
    """LoRA adapters for ``finetune: qlora``."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0, le=1024, description="adapter rank")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or module names")
    merge: bool = Field(True, description="save the adapters merged into a dense model (else the base, with adapters in adapter/)")


class QatSpec(BaseModel):
    """Fake quantization for ``finetune: qat``; match the quantize stage that follows."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = Field(4, description="weight bits")
    group_size: GroupSize = Field(128, description="weights per scale: 32, 64, 128, 256, or -1 for one scale per output channel")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="Linear modules left in full precision")


# --- QLoRA ------------------------------------------------------------------------------

def load_qlora(model_dir: str | Path, lora: LoraSpec, device: str, gradient_checkpointing: bool) -> Any:
    """The frozen 4-bit base with trainable LoRA adapters."""
    if not device.startswith("cuda"):
        raise UserError.field("finetune", "qlora", "needs a CUDA GPU (bitsandbytes 4-bit kernels); this process has none — use finetune: full or qat on CPU")
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16, use_safetensors=True, device_map={"": torch.cuda.current_device()},
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("qlora: 4-bit NF4 base frozen, %d trainable adapter parameters (r=%d)", trainable, lora.r)
    return model


def save_qlora(model: Any, base_dir: str | Path, out_dir: str | Path, tokenizer: Any, lora: LoraSpec, dtype: Any) -> None:
    """Adapters to ``out_dir/adapter``; the dense model beside them, merged if asked."""
    from llmpress.components.models.io import save_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    model.save_pretrained(out / "adapter", safe_serialization=True)
    # Merge into the original 16-bit base, not the 4-bit one: merging into NF4 would
    # round the adapters' update away.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, use_safetensors=True)
    if lora.merge:
        base = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    save_model(base, tokenizer, out)


# --- QAT --------------------------------------------------------------------------------

class FakeQuantize:
    """Parametrization: weight -> symmetric per-group quantize-dequantize, with a
    straight-through gradient (the rounding counts as identity in the backward pass)."""

    def __init__(self, bits: int, group_size: int) -> None:
        self.qmax = 2 ** (bits - 1) - 1
        self.group_size = group_size

    def module(self) -> Any:
        import torch

        spec = self

        class _FakeQuant(torch.nn.Module):
            def forward(self, weight: torch.Tensor) -> torch.Tensor:
                return spec(weight)

        return _FakeQuant()

    def __call__(self, weight: Any) -> Any:
        rows, cols = weight.shape
        group = cols if self.group_size == -1 or cols % self.group_size else self.group_size
        w = weight.reshape(rows, cols // group, group)
        scale = w.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / self.qmax
        q = (w / scale).round().clamp(-self.qmax - 1, self.qmax) * scale
        return (w + (q - w).detach()).reshape(rows, cols)


def prepare_qat(model: Any, qat: QatSpec) -> int:
    """Fake-quantize every Linear weight but the ignored ones; returns how many."""
    import torch
    from torch.nn.utils import parametrize

    fake = FakeQuantize(qat.bits, qat.group_size)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(name == i or name.endswith("." + i) for i in qat.ignore):
            parametrize.register_parametrization(module, "weight", fake.module())
            count += 1
    if not count:
        raise UserError.field("qat.ignore", qat.ignore, "no Linear layer is left to train quantization-aware")
    log.info("qat: %d Linear layers fake-quantized to int%d, group %d", count, qat.bits, qat.group_size)
    return count


def finish_qat(model: Any) -> None:
    """Bake the fake-quantized weights in, so the saved model is plain Linear layers."""
    import torch
    from torch.nn.utils import parametrize

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

