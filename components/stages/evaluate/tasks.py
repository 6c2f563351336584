"""Task accuracy through lm-evaluation-harness, on the model the evaluation already loaded.

A task is named three ways (``EvaluateConfig.tasks``):

- ``builtin:pydoc-cloze``: ships with llmpress (``components/stages/evaluate/evaltasks/``), offline;
- a local task YAML (``….yaml``) in the harness's own format, offline when its data
  files are local: ``dataset_path: json`` with ``dataset_kwargs.data_files`` paths
  relative to the YAML's folder (s3:// files are fetched by the component layer first);
- a harness task name (``hellaswag``, ``arc_easy``, ``mmlu_abstract_algebra``, …): its
  data comes from the Hugging Face hub or its cache, so only where that is reachable.

Results become ``task.<task>.<metric>`` (``acc``, ``acc_norm``, ``acc_stderr`` …) and
``task.<task>.samples``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from pathlib import Path
from typing import Any

from llmpress.components.errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "evaltasks"
BUILTIN_TASKS = {"pydoc-cloze": TASKS_DIR / "pydoc_cloze.yaml"}


def task_metrics(
    model: Any, tokenizer: Any, tasks: list[str], limit: int | None, num_fewshot: int | None, batch_size: int, device: str, field: str = "evaluation"
) -> dict[str, float]:
    """Run the tasks with lm-evaluation-harness and return their figures, flat."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task chatter buries ours
    loaded: list[Any] = []
    named: list[str] = []
    for i, spec in enumerate(tasks):
        where = f"{field}.tasks[{i}]"
        if spec.startswith("builtin:"):
            path = BUILTIN_TASKS.get(spec.removeprefix("builtin:"))
            if path is None:
                raise UserError.field(where, spec, f"builtin tasks are {', '.join('builtin:' + n for n in BUILTIN_TASKS)}")
            loaded += _local_tasks(path, where)
        elif spec.startswith("s3://"):
            raise UserError.field(where, spec, "s3:// task files must be downloaded before the stage runs (component layer)")
        elif spec.endswith((".yaml", ".yml")):
            loaded += _local_tasks(Path(spec).expanduser(), where)
        else:
            named.append(spec)
    manager = TaskManager(include_defaults=bool(named))  # indexing the harness's own tasks takes seconds: only when named
    for i, name in ((i, s) for i, s in enumerate(tasks) if s in named):
        if name not in manager.all_tasks:
            near = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UserError.field(f"{field}.tasks[{i}]", name, f"not an lm-evaluation-harness task, builtin:NAME or a .yaml file{hint}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        results = simple_evaluate(
            model=lm, tasks=loaded + named, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            log_samples=False, bootstrap_iters=1000, verbosity="WARNING",
        )
    except (ConnectionError, OSError) as err:  # a named task whose data is neither on the hub nor cached
        raise UserError.field(f"{field}.tasks", named, f"could not load task data ({type(err).__name__}); harness tasks need the hub or its cache") from None
    return flatten_results(results)


def _local_tasks(path: Path, where: str) -> list[Any]:
    """Build the task(s) of one YAML from its own folder, so relative data files resolve there."""
    from lm_eval.tasks import TaskManager

    if not path.is_file():
        raise UserError.field(where, str(path), "task YAML not found")
    match = re.search(r"^task:\s*['\"]?([\w.\-]+)", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    if not match:
        raise UserError.field(where, str(path), "a task YAML needs a top-level 'task: NAME'")
    with contextlib.chdir(path.parent):
        manager = TaskManager(include_path=str(path.parent), include_defaults=False)
        try:
            return list(manager.load([match.group(1)])["tasks"].values())
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise UserError.field(where, str(path), f"lm-evaluation-harness could not load it ({type(err).__name__}: {str(err)[:120]})") from None


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """``{"results": {task: {"acc,none": …}}}`` → ``{"task.<task>.acc": …}`` (numbers only)."""
    out: dict[str, float] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, sep, filt = key.partition(",")
            if not sep or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            out[f"task.{task}.{metric if filt == 'none' else metric + '.' + filt}"] = float(value)
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        if samples is not None:
            out[f"task.{task}.samples"] = samples
    return out
