"""Does the activation-based importance score choose well? Perplexity after structured
pruning (no recovery training) with the score of ``prune_structured.importance``,
against two baselines that keep the same number of units: a seeded random choice and a
weight-only score (``‖W_down[:, j]‖²`` per channel, ``‖W_o[:, h]‖²_F`` per head).

    python benchmarks/prune_structured_quality.py
"""

from __future__ import annotations

import argparse
import copy

import torch
from llmpress.components.data import DataSpec, calibration_samples, load_texts, token_stream
from llmpress.components.models.builtin import build_builtin
from llmpress.components.models.io import count_parameters, load_model
from llmpress.components.stages.evaluate import perplexity
from llmpress.components.stages.prune import structured as prune_structured


def weight_scores(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = prune_structured.model_shape(model)
    scores = []
    for layer in model.model.layers:
        w_o = layer.self_attn.o_proj.weight.detach().float().reshape(shape.hidden, shape.kv_heads, -1)
        scores.append((w_o.pow(2).sum((0, 2)), layer.mlp.down_proj.weight.detach().float().pow(2).sum(0)))
    return scores


def random_scores(model: torch.nn.Module, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = prune_structured.model_shape(model)
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(shape.kv_heads, generator=g), torch.rand(shape.intermediate, generator=g)) for _ in model.model.layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pydoc-llama-4m")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.4])
    args = parser.parse_args()
    base, tokenizer = load_model(build_builtin(args.model), dtype="float32")
    calibration = DataSpec(source="builtin:pydoc-train", num_samples=64, seq_len=256, seed=0)
    samples = calibration_samples(calibration, tokenizer, load_texts(calibration))
    stream = token_stream(load_texts(DataSpec(source="builtin:pydoc-eval")), tokenizer)

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, stream, 256, 256, 64, 8, "cpu")[0]

    params = count_parameters(base)
    choices = {"activation score (llmpress)": prune_structured.importance(base, samples, "cpu"), "weight norm only": weight_scores(base)}
    choices.update({f"random (seed {s})": random_scores(base, s) for s in (0, 1, 2)})
    print(f"model builtin:{args.model} ({params / 1e6:.2f} M parameters, float32), dense perplexity {ppl(base):.2f} on builtin:pydoc-eval (64×256)")
    print("\n| FFN channels removed | key/value groups removed | params removed | " + " | ".join(choices) + " |")
    print("|---|---|---|" + "---|" * len(choices))
    for attention in (0.0, 0.5):
        for ratio in args.ratios:
            groups, channels = prune_structured.plan(base, params, attention, ratio, None, 8)
            row = []
            for scores in choices.values():
                model = copy.deepcopy(base)
                prune_structured.shrink(model, prune_structured.choose(scores, groups, channels))
                row.append(f"{ppl(model):.2f}")
            removed = 1 - count_parameters(model) / params
            shape = prune_structured.model_shape(base)
            cells = [f"{1 - channels / shape.intermediate:.0%}", f"{shape.kv_heads - groups} of {shape.kv_heads}", f"{removed:.1%}", *row]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
