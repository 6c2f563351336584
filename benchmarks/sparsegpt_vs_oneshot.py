"""SparseGPT through llmpress equals llm-compressor called directly.

The same model (builtin:pydoc-llama-4m, pretrained by llmpress), the same calibration
windows and the same evaluation text; once through llmpress's prune stage
(``prune.run``), once through llm-compressor's documented call
(``oneshot(model, dataset, recipe=SparseGPTModifier(sparsity=…, mask_structure=…,
targets=[r"re:model.layers.\\d*$"]))``). Prints perplexity of the dense model and of
both pruned models, and the largest weight difference between the two.

    python benchmarks/sparsegpt_vs_oneshot.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier
from llmpress.components.data import DataSpec, calibration_samples, load_texts, token_stream
from llmpress.components.models.builtin import build_builtin
from llmpress.components.models.io import load_model
from llmpress.components.models.sparsity import decoder_layers, linear_weights
from llmpress.components.stages import prune
from llmpress.components.stages.evaluate import perplexity


def evaluate(model: torch.nn.Module, stream: list[int], seq_len: int, windows: int) -> float:
    return perplexity(model, stream, seq_len, seq_len, windows, 8, "cpu")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pydoc-llama-4m")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    model_dir = build_builtin(args.model)
    calibration = DataSpec(source="builtin:pydoc-train", num_samples=args.samples, seq_len=args.seq_len, seed=0)
    evaluation = DataSpec(source="builtin:pydoc-eval", num_samples=64, seq_len=256)
    dense, tokenizer = load_model(model_dir)
    texts = load_texts(calibration)
    samples = calibration_samples(calibration, tokenizer, texts)
    stream = token_stream(load_texts(evaluation), tokenizer)
    print(f"model builtin:{args.model}, {args.samples}×{args.seq_len} calibration tokens, perplexity on builtin:pydoc-eval (64 windows of 256)")
    print("\n| sparsity | dense ppl | llmpress ppl | llm-compressor ppl | max abs weight difference |\n|---|---|---|---|---|")
    base_ppl = evaluate(dense, stream, evaluation.seq_len, evaluation.num_samples)
    for mask in ("0:0", "2:4"):
        with tempfile.TemporaryDirectory() as tmp:
            prune.run(model_dir, Path(tmp) / "pruned", prune.PruneConfig(method="sparsegpt", sparsity=0.5 if mask == "0:0" else None, mask_structure=mask),
                      calibration, texts)
            ours, _ = load_model(Path(tmp) / "pruned")
        direct, _ = load_model(model_dir)
        dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
        oneshot(model=direct, dataset=dataset, recipe=SparseGPTModifier(sparsity=0.5, mask_structure=mask, targets=[r"re:model.layers.\d*$"]),
                max_seq_length=args.seq_len, num_calibration_samples=args.samples, shuffle_calibration_samples=False)
        pairs = zip(linear_weights(decoder_layers(ours)), linear_weights(decoder_layers(direct)), strict=True)
        diff = max(float((a.weight.detach().float() - b.weight.detach().float()).abs().max()) for (_, a), (_, b) in pairs)
        label = "50% unstructured" if mask == "0:0" else "2:4"
        print(f"| {label} | {base_ppl:.3f} | {evaluate(ours, stream, 256, 64):.3f} | {evaluate(direct, stream, 256, 64):.3f} | {diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
