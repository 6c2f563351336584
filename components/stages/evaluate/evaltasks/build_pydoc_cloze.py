"""Rebuild pydoc_cloze.jsonl: `python components/stages/evaluate/evaltasks/build_pydoc_cloze.py`.

A four-way sentence-completion task (HellaSwag's shape) on the held-out tenth of
CPython's documentation topics (``builtin:pydoc-eval``), so the builtin models are
never scored on text they were trained on. Each sentence is cut near its middle; the
right ending competes with the endings of three other sentences, drawn from seed 0.
Deterministic: the same CPython docs give the same file.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llmpress.components.data import pydoc_corpus

MAX_ITEMS = 100


def items() -> list[dict[str, object]]:
    text = " ".join(pydoc_corpus("eval").split())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 12 <= len(s.split()) <= 40 and s[0].isupper() and ">>>" not in s]
    rng = random.Random(0)
    cut = [(" ".join(s.split()[: len(s.split()) // 2]), " ".join(s.split()[len(s.split()) // 2 :])) for s in sentences]
    out = []
    for i, (context, ending) in enumerate(cut[:MAX_ITEMS]):
        others = rng.sample([e for j, (_, e) in enumerate(cut) if j != i and e != ending], 3)
        label = rng.randrange(4)
        choices = others[:label] + [ending] + others[label:]
        out.append({"id": i, "context": context, "choices": choices, "label": label})
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("pydoc_cloze.jsonl")
    path.write_text("".join(json.dumps(item) + "\n" for item in items()))
    print(f"wrote {path}")
