"""Where the student comes from, and the check that it can learn from the teacher.

Three sources: a model directory (the stage's input, e.g. a pruned model, or a given
model), or a smaller configuration derived from the teacher. A derived student that
keeps the teacher's width starts from the teacher's own weights, taking evenly spaced
layers (DistilBERT's initialisation); a narrower one has no weights to take and starts
from a seeded random initialisation.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from llmpress.components.errors import UserError

log = logging.getLogger("llmpress")

SHRINK_FIELDS = {  # StudentSpec field -> config attribute
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def kept_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, first and last included."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def derive_student(teacher: Any, shrink: dict[str, int], seed: int) -> tuple[Any, str]:
    """A smaller model of the teacher's architecture; returns (model, how it was initialised)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    t_layers = config.num_hidden_layers
    for field, value in shrink.items():
        attr = SHRINK_FIELDS[field]
        current = getattr(config, attr, None)
        if current is None:
            raise UserError.field(f"student.{field}", value, f"the teacher's config ({config.model_type}) has no {attr}")
        if value > current:
            raise UserError.field(f"student.{field}", value, f"must not exceed the teacher's {attr} ({current})")
        setattr(config, attr, value)
    if config.hidden_size % config.num_attention_heads:
        raise UserError.field("student.hidden_size", config.hidden_size, f"must be a multiple of num_attention_heads ({config.num_attention_heads})")
    if hasattr(config, "head_dim") and ("hidden_size" in shrink or "num_attention_heads" in shrink):
        config.head_dim = config.hidden_size // config.num_attention_heads
    keep = kept_layers(t_layers, config.num_hidden_layers)
    if getattr(config, "layer_types", None):  # per-layer attention kinds follow the kept layers
        config.layer_types = [config.layer_types[i] for i in keep]
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    same_width = not (set(shrink) - {"num_layers"})
    if not same_width:
        return student, "random"
    source = teacher.state_dict()
    renamed = {}
    for new, old in enumerate(keep):
        for key, value in source.items():
            if f".layers.{old}." in key:
                renamed[key.replace(f".layers.{old}.", f".layers.{new}.")] = value
    renamed.update({k: v for k, v in source.items() if not _LAYER.search(k)})
    missing, unexpected = student.load_state_dict(renamed, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"derived student: unmatched weights {missing[:3]} {unexpected[:3]}")
    return student, f"teacher-layers:{','.join(map(str, keep))}"


def check_same_tokenizer(teacher_tok: Any, student_tok: Any, teacher_vocab: int, student_vocab: int, student_source: str) -> None:
    """Logits are compared token by token: both models must index the same vocabulary."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        t, s = len(teacher_tok), len(student_tok)
        detail = f"{s} tokens vs the teacher's {t}" if s != t else "same size, different tokens"
        allowed = f"its tokenizer differs from the teacher's ({detail}); teacher and student must share a tokenizer"
        raise UserError.field("student.source", student_source, allowed)
    if teacher_vocab != student_vocab:
        raise UserError.field(
            "student.source", student_source,
            f"its output layer has {student_vocab} logits, the teacher's {teacher_vocab}; teacher and student must share a vocabulary",
        )


def weights_dtype(model_dir: str | Path) -> str:
    """The dtype a model directory was saved in (so the student is saved the same way)."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")
