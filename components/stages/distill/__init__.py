"""Distillation: a student learns from a teacher's soft targets, one config, one ``run()``.

    loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)

The student is the stage's input model (the recipe's model, or the output of an
earlier stage such as prune: distillation as recovery), a given model, or a smaller
configuration derived from the teacher. The same family fine-tunes a compressed model:
``finetune: qlora`` (4-bit frozen base + LoRA) and ``finetune: qat`` (quantization-aware).

Training runs on the Hugging Face Trainer (``distill_train``), with DeepSpeed ZeRO on
GPUs, checkpoints under ``work_dir`` that a rerun resumes from, and per-step progress.
``run()`` is what every process executes: alone, or as one rank under torchrun
(``distill_launch`` starts those).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from llmpress.components.data import DataSpec, calibration_samples
from llmpress.components.errors import UserError
from llmpress.components.models.io import count_parameters, pick_device, save_model, weights_size_bytes
from llmpress.components.models.measure import peak_memory, self_check
from llmpress.components.stages.distill import data as distill_data
from llmpress.components.stages.distill import finetune
from llmpress.components.stages.distill import student as distill_student
from llmpress.components.stages.distill import train as distill_train
from llmpress.components.stages.distill.finetune import LoraSpec, QatSpec
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("llmpress")


class StudentSpec(BaseModel):
    """Where the student starts."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "input",
        description="'input': the stage's input model (e.g. a pruned model); 'teacher': a smaller config derived from the teacher; "
        "or a model source (local dir, builtin:NAME, hf:ORG/NAME)",
    )
    num_layers: int | None = Field(None, gt=0, description="derived student: layers (evenly spaced teacher layers are copied)")
    hidden_size: int | None = Field(None, gt=0, description="derived student: width (a narrower student starts from random weights)")
    intermediate_size: int | None = Field(None, gt=0, description="derived student: MLP width")
    num_attention_heads: int | None = Field(None, gt=0, description="derived student: attention heads")
    num_key_value_heads: int | None = Field(None, gt=0, description="derived student: key/value heads")

    def shrink(self) -> dict[str, int]:
        """The derived-config fields that are set."""
        return {k: v for k in distill_student.SHRINK_FIELDS if (v := getattr(self, k)) is not None}

    @model_validator(mode="after")
    def _shrink_needs_teacher(self) -> StudentSpec:
        if self.shrink() and self.source != "teacher":
            raise ValueError(f"{', '.join(self.shrink())} derive a student from the teacher; set student.source: teacher, or drop them")
        return self


class DistillConfig(BaseModel):
    """Settings of a distill stage: loss = alpha*T^2*KL(t/T || s/T) + (1-alpha)*CE."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T")
    steps: int = Field(100, gt=0, description="optimizer steps")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    kl: Literal["forward", "reverse"] = Field("forward", description="forward KL(teacher || student) or reverse KL(student || teacher)")
    top_k: int | None = Field(None, gt=0, description="keep only the teacher's top-k logits per token (needed by teacher_cache)")
    teacher_cache: bool = Field(False, description="run the teacher once, store its top-k logits, train without loading it")
    student: StudentSpec = Field(default_factory=StudentSpec)
    finetune: Literal["full", "qlora", "qat"] = Field("full", description="train all weights, LoRA on a 4-bit base, or quantization-aware")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    qat: QatSpec = Field(default_factory=QatSpec)
    data: DataSpec | None = Field(None, description="training text (num_samples windows of seq_len); default: the recipe's data.calibration")
    batch_size: int = Field(8, gt=0, le=4096, description="sequences per device per micro-step")
    gradient_accumulation: int = Field(1, gt=0, le=1024, description="micro-steps per optimizer step")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of steps spent warming up")
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = Field(True, description="recompute activations in backward: less memory, ~30% more compute")
    deepspeed: Literal["auto", "off", "zero2", "zero3"] = Field("auto", description="shipped ZeRO config; auto: zero2 on CUDA, off on CPU")
    save_every: int = Field(50, gt=0, description="steps between checkpoints (a rerun resumes from the last)")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train")

    @model_validator(mode="after")
    def _combinations(self) -> DistillConfig:
        if self.teacher_cache and self.top_k is None:
            raise ValueError("teacher_cache stores the teacher's top-k logits: set top_k (e.g. 64)")
        if self.teacher_cache and self.alpha == 0:
            raise ValueError("teacher_cache is set but alpha is 0, so the teacher is never used; drop teacher_cache or raise alpha")
        if self.finetune == "qlora" and self.deepspeed in ("zero2", "zero3"):
            raise ValueError(f"finetune qlora trains with DDP, not DeepSpeed {self.deepspeed}: set deepspeed: off or auto")
        if self.finetune == "qat" and self.deepspeed == "zero3":
            raise ValueError("finetune qat needs whole weights on each GPU to fake-quantize them: use deepspeed zero2 (or auto)")
        if self.finetune == "qlora" and self.student.source == "teacher":
            raise ValueError("finetune qlora adapts an existing model; a student derived from the teacher has nothing to adapt")
        return self


Callback = Callable[[int, dict[str, float]], None]


def run(
    student_dir: str | Path | None,
    out_dir: str | Path,
    config: DistillConfig,
    data: DataSpec,
    texts: list[str],
    teacher_dir: str | Path | None,
    work_dir: str | Path,
    on_log: Callback | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Train the student into ``out_dir``; checkpoints, progress and the teacher cache
    live in ``work_dir`` (a rerun with the same ``work_dir`` resumes). ``student_dir`` is
    the student's starting model (None when derived from the teacher)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    device = _device(config)
    rank = int(os.environ.get("RANK", "0"))
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    uses_teacher = config.alpha > 0 or config.student.source == "teacher"
    if uses_teacher and teacher_dir is None:
        raise UserError.field("teacher", None, "missing — this distill stage needs a teacher model")
    if student_dir is None and config.student.source != "teacher":
        raise UserError.field("student.source", config.student.source, "no student model directory was given")
    deepspeed = distill_train.deepspeed_config(config.deepspeed, device, config.finetune)
    if deepspeed:
        distill_train.ensure_process_group_env()

    # The teacher's tokenizer and config are cheap; its weights are loaded only when
    # something needs them (a derived student, online logits, building the cache).
    teacher = teacher_tok = teacher_config = None
    if uses_teacher:
        teacher_tok, teacher_config = _teacher_meta(teacher_dir)
    tokenizer = teacher_tok if config.student.source == "teacher" else AutoTokenizer.from_pretrained(student_dir)
    windows = calibration_samples(data, tokenizer, texts, field="data")
    cache_dir = work / "teacher-cache" / distill_data.cache_key(teacher_dir, windows, config.top_k) if config.teacher_cache else None
    cache_missing = cache_dir is not None and not (cache_dir / distill_data.CACHE_FILE).is_file()
    if config.student.source == "teacher" or (config.alpha > 0 and cache_dir is None) or (cache_missing and rank == 0):
        teacher = _load_teacher(teacher_dir, device)

    # The student, and the check that it reads the same tokens as the teacher.
    student_init = "input" if config.student.source == "input" else "given"
    base_dir = student_dir
    if config.student.source == "teacher":
        student, student_init = distill_student.derive_student(teacher, config.student.shrink(), config.seed)
        base_dtype = distill_student.weights_dtype(teacher_dir)
    elif config.finetune == "qlora":
        student = finetune.load_qlora(student_dir, config.lora, device, config.gradient_checkpointing)
        base_dtype = distill_student.weights_dtype(student_dir)
    else:
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32, use_safetensors=True)
        base_dtype = distill_student.weights_dtype(student_dir)
    if teacher_config is not None:
        distill_student.check_same_tokenizer(teacher_tok, tokenizer, teacher_config.vocab_size, student.config.vocab_size, config.student.source)
    if config.finetune != "qlora":
        student = student.float()  # fp32 master weights; bf16 happens in autocast / DeepSpeed
    if config.finetune == "qat":
        finetune.prepare_qat(student, config.qat)
    student.config.use_cache = False

    # The teacher cache: built once (by rank 0); training then reads it, not the teacher.
    metrics: dict[str, Any] = {}
    cache = None
    if cache_dir is not None:
        if cache_missing and rank == 0:
            metrics.update(distill_data.build_teacher_cache(teacher, windows, config.top_k, cache_dir, device, config.batch_size))
        distill_data.wait_for_cache(cache_dir)
        metrics["teacher_cache_bytes"] = (cache_dir / distill_data.CACHE_FILE).stat().st_size
        cache = distill_data.TeacherCache(cache_dir)
    if teacher is not None:
        metrics["teacher_num_parameters"] = count_parameters(teacher)
        if cache is not None or config.alpha == 0:
            teacher = None
            _free_memory()

    checkpoints = work / "checkpoints"
    resume, resumed_step = distill_train.last_checkpoint(checkpoints)
    if resume:
        log.info("resuming from %s (step %d of %d)", resume, resumed_step, config.steps)
    args = distill_train.training_args(checkpoints, config, device, deepspeed)
    if teacher is not None:
        teacher.to(args.device).eval().requires_grad_(False)
    callback = distill_train.progress_callback(config.steps, work / "progress.jsonl", on_log, on_checkpoint)
    trainer = distill_train.make_trainer(
        student, distill_data.WindowDataset(windows), args, teacher, cache, config.alpha, config.temperature,
        config.kl == "reverse", config.top_k, [callback],
    )
    with peak_memory(device) as peak:
        train_start = time.time()
        result = trainer.train(resume_from_checkpoint=resume)
        train_s = time.time() - train_start

    losses = [h for h in trainer.state.log_history if "loss" in h]
    gathered = _gather_deepspeed(trainer, config, work)
    num_parameters = 0
    if trainer.is_world_process_zero():
        num_parameters = _save(trainer, gathered, tokenizer, out_dir, config, base_dir, base_dtype)
    if trainer.args.world_size > 1:
        torch.distributed.barrier()
    del trainer, student, teacher
    _free_memory()
    steps_run = config.steps - resumed_step
    tokens = steps_run * config.batch_size * config.gradient_accumulation * args.world_size * data.seq_len
    metrics.update({
        "train_loss_first": losses[0]["loss"] if losses else float("nan"),
        "train_loss_last": losses[-1]["loss"] if losses else float("nan"),
        "train_loss_mean": result.training_loss,
        "steps": config.steps,
        "resumed_from_step": resumed_step,
        "train_samples": len(windows),
        "train_wall_s": train_s,
        "train_tokens_per_s": tokens / train_s if train_s else 0.0,
        "world_size": args.world_size,
        "deepspeed_stage": {"zero2.json": 2, "zero3.json": 3}.get(deepspeed.name, 0) if deepspeed else 0,
        "teacher_loaded_during_training": int(config.alpha > 0 and cache is None),
        "peak_memory_bytes": peak["bytes"],
        "wall_time_s": time.time() - start,
    })
    if rank == 0:
        self_check(out_dir, "cuda" if device.startswith("cuda") else device)
        size = weights_size_bytes(out_dir)
        metrics.update(size_bytes=size, num_parameters=num_parameters, bits_per_parameter=8 * size / num_parameters)
    log.info("distill: student init %s, %d steps (%d resumed), %.1fs training", student_init, config.steps, resumed_step, train_s)
    return metrics


def _device(config: DistillConfig) -> str:
    device = pick_device(config.device)
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local_rank is not None:
        import torch

        torch.cuda.set_device(int(local_rank))
        return f"cuda:{local_rank}"
    return device


def _teacher_meta(model_dir: str | Path) -> tuple[Any, Any]:
    """The teacher's tokenizer and config, without its weights."""
    from llmpress.components.models.io import check_model_dir
    from transformers import AutoConfig, AutoTokenizer

    path = check_model_dir(model_dir, field="teacher.source")
    return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)


def _load_teacher(model_dir: str | Path, device: str) -> Any:
    """The teacher: frozen, in its saved dtype on GPU (fp32 on CPU, where bf16 is slow)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", use_safetensors=True)
    if not device.startswith("cuda"):
        model = model.float()
    return model.to(device).eval().requires_grad_(False)


def _free_memory() -> None:
    """Give back what dropped models held (the GPU allocator keeps freed blocks otherwise)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gather_deepspeed(trainer: Any, config: DistillConfig, work: Path) -> Path | None:
    """Under DeepSpeed every rank takes part in gathering the weights (ZeRO-3 shards
    them): write them to ``work/gathered`` and return that folder."""
    if not trainer.is_deepspeed_enabled:
        return None
    if config.finetune == "qat":  # ZeRO-2 keeps full weights on every rank: bake them in place
        finetune.finish_qat(trainer.accelerator.unwrap_model(trainer.model))
    gathered = work / "gathered"
    trainer.save_model(str(gathered))
    # Later from_pretrained calls would otherwise partition what they load under ZeRO-3's
    # still-registered config and save empty tensors.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return gathered


def _save(trainer: Any, gathered: Path | None, tokenizer: Any, out_dir: str | Path, config: DistillConfig, base_dir: Any, base_dtype: str) -> int:
    """The trained student as a plain model directory in the dtype its source had
    (16-bit, as the next stages expect); returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, base_dtype, torch.float32)
    if config.finetune == "qlora":
        finetune.save_qlora(trainer.model, base_dir, out_dir, tokenizer, config.lora, dtype)
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, use_safetensors=True)
    elif gathered is not None:
        model = AutoModelForCausalLM.from_pretrained(gathered, dtype=dtype, use_safetensors=True)
    else:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if config.finetune == "qat":
            finetune.finish_qat(model)
    model.config.use_cache = True
    if config.finetune != "qlora":
        save_model(model.to(dtype), tokenizer, out_dir)
    return count_parameters(model)
