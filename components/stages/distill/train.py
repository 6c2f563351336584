"""The training loop of the distill stage: Hugging Face's Trainer with the distillation
loss, DeepSpeed when asked, checkpoints it resumes from, and per-step progress.

The Trainer brings what a long run needs and we do not rewrite: DeepSpeed ZeRO and
DDP under torchrun, bf16, gradient checkpointing and gradient accumulation, and
checkpoints that hold optimizer, scheduler, RNG and data position, so that a killed run
continues where it stopped instead of starting over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmpress.components.errors import UserError
from llmpress.components.stages.distill.loss import distill_loss

log = logging.getLogger("llmpress")

DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"
StepCallback = Callable[[int, dict[str, float]], None]


def deepspeed_config(choice: str, device: str, finetune: str) -> Path | None:
    """The shipped ZeRO config to use, or None for plain (DDP) training."""
    if choice == "off" or (choice == "auto" and (not device.startswith("cuda") or finetune == "qlora")):
        return None
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        if choice == "auto":
            log.warning("deepspeed is not installed: training with plain DDP (pip install 'llmpress[gpu]')")
            return None
        raise UserError.field("deepspeed", choice, "the deepspeed package is not installed; pip install 'llmpress[gpu]' or use deepspeed: off") from None
    if not device.startswith("cuda"):
        raise UserError.field("deepspeed", choice, "DeepSpeed ZeRO needs CUDA GPUs; this process has none — use deepspeed: off (or auto) on CPU")
    return DEEPSPEED_DIR / f"{'zero2' if choice == 'auto' else choice}.json"


def ensure_process_group_env() -> None:
    """DeepSpeed wants a process group even for one process; outside torchrun, make
    this process rank 0 of 1 (what Hugging Face documents for notebooks)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def make_trainer(student: Any, dataset: Any, args: Any, teacher: Any, cache: Any, alpha: float, temperature: float,
                 reverse: bool, top_k: int | None, callbacks: list[Any]) -> Any:
    """A Trainer whose loss is the distillation loss (teacher online, or from the cache)."""
    import torch
    from transformers import PrinterCallback, Trainer, default_data_collator

    class DistillTrainer(Trainer):
        # Our loss is a per-token mean of one micro-batch: let the Trainer divide by
        # the accumulation steps itself.
        model_accepts_loss_kwargs = False

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self._parts: dict[str, list[float]] = {}

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            index = inputs.pop("index")
            labels = inputs.pop("labels")
            outputs = model(input_ids=inputs["input_ids"])
            teacher_logits = topk = None
            if alpha > 0:
                if cache is not None:
                    topk = cache.rows(index.tolist(), outputs.logits.device)
                else:
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=inputs["input_ids"]).logits
                    if top_k:
                        top = torch.topk(teacher_logits, top_k, dim=-1)
                        topk, teacher_logits = (top.values, top.indices), None
            loss, parts = distill_loss(outputs.logits, labels, alpha, temperature, teacher_logits, topk, reverse)
            for key, value in parts.items():
                self._parts.setdefault(key, []).append(value)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                for key, values in self._parts.items():
                    logs[f"{key}_loss"] = sum(values) / len(values)
                self._parts = {}
            super().log(logs, start_time)

    trainer = DistillTrainer(model=student, args=args, train_dataset=dataset, data_collator=default_data_collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; Progress logs a readable line instead
    return trainer


def progress_callback(total_steps: int, progress_file: Path, on_log: StepCallback | None, on_checkpoint: Callable[[Path], None] | None) -> Any:
    """Per step: a log line, a JSON line in ``progress_file`` and ``on_log`` (the
    component's MLflow logger); per checkpoint: ``on_checkpoint`` (its artifact sync).
    Only the main process reports."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.time()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            metrics = {f"train.{k}": float(v) for k, v in logs.items() if isinstance(v, int | float) and k != "epoch"}
            step = state.global_step
            with progress_file.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if on_log:
                on_log(step, metrics)
            if step == 1 or step % 10 == 0 or step == total_steps:
                parts = " ".join(f"{k.removesuffix('_loss')} {logs[k]:.4f}" for k in ("kd_loss", "ce_loss") if k in logs)
                log.info("distill step %d/%d loss %.4f %s (%.0fs)", step, total_steps, logs["loss"], parts, time.time() - self.start)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                log.info("checkpoint at step %d: %s", state.global_step, path)
                if on_checkpoint:
                    on_checkpoint(path)

    return Progress()


def training_args(output_dir: Path, config: Any, device: str, deepspeed: Path | None) -> Any:
    """TrainingArguments from the stage's config."""
    import torch
    from transformers import TrainingArguments

    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=int(config.warmup_ratio * config.steps),
        weight_decay=config.weight_decay,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=2,
        bf16=bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        deepspeed=str(deepspeed) if deepspeed else None,
        use_cpu=not device.startswith("cuda"),
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def last_checkpoint(output_dir: Path) -> tuple[str | None, int]:
    """The newest complete checkpoint in ``output_dir`` and its step ((None, 0) if none).
    The Trainer writes trainer_state.json last, so a checkpoint cut short by a kill
    lacks it and the one before is taken."""
    steps = []
    for path in output_dir.glob("checkpoint-*"):
        if path.name.removeprefix("checkpoint-").isdigit() and (path / "trainer_state.json").is_file():
            steps.append((int(path.name.removeprefix("checkpoint-")), path))
    if not steps:
        return None, 0
    step, path = max(steps)
    return str(path), step
