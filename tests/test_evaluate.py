"""The evaluate stage: perplexity against a plain PyTorch reference, cost figures, speed
figures labelled with device and shapes, ratios to the baseline, and clear config errors."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_recipe


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model in float32 (the reference comparison is about the algorithm, not bf16 rounding)."""
    from llmpress.components.data import DataSpec, load_texts, token_stream
    from llmpress.components.models.io import load_model

    model, tokenizer = load_model(tiny_model_dir, dtype="float32")
    stream = token_stream(load_texts(DataSpec(source="builtin:pydoc-eval")), tokenizer)[:461]  # not a multiple of any window
    return model, tokenizer, stream


def reference_perplexity(model, stream, seq_len, stride):
    """The textbook strided loop, one window at a time (Hugging Face's perplexity guide):
    each window scores the tokens the previous one did not reach."""
    import torch

    ids = torch.tensor(stream)
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(stream), stride):
        end = min(begin + seq_len, len(stream))
        new = end - prev_end  # tokens not scored yet, at the end of this window
        window = ids[begin:end].unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0].double(), dim=-1)
        for pos in range(max(end - new, begin + 1), end):  # token at pos, predicted from pos - 1
            nll -= logp[pos - 1 - begin, ids[pos]].item()
            count += 1
        prev_end = end
        if end == len(stream):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize(
    ("seq_len", "stride", "batch_size"), [(64, 64, 3), (64, 24, 4), (50, 25, 8)], ids=["non-overlapping", "overlapping", "half-overlap-one-batch"]
)
def test_perplexity_equals_plain_pytorch_reference(tiny, seq_len, stride, batch_size):
    from llmpress.components.stages.evaluate import perplexity

    model, _, stream = tiny
    expected, expected_count = reference_perplexity(model, stream, seq_len, stride)
    got, count, windows = perplexity(model, stream, seq_len, stride, max_windows=10_000, batch_size=batch_size, device="cpu")
    # overlapping: every token but the stream's first, once; disjoint: no window's first token
    assert count == expected_count == (len(stream) - 1 if stride < seq_len else len(stream) - windows)
    assert got == pytest.approx(expected, rel=1e-4)


def test_overlapping_windows_give_tokens_more_context(tiny):
    from llmpress.components.stages.evaluate import perplexity

    model, _, stream = tiny
    disjoint, _, _ = perplexity(model, stream, 64, 64, 10_000, 8, "cpu")
    overlapping, _, _ = perplexity(model, stream, 64, 16, 10_000, 8, "cpu")
    assert overlapping < disjoint


def test_max_windows_caps_the_scored_windows(tiny):
    from llmpress.components.stages.evaluate import perplexity

    model, _, stream = tiny
    _, count, windows = perplexity(model, stream, 32, 32, max_windows=3, batch_size=2, device="cpu")
    assert windows == 3 and count == 3 * (32 - 1)


def test_sparsity_counts_exact_zeros_in_linear_weights(tiny_model_dir):
    import torch
    from llmpress.components.models.io import load_model
    from llmpress.components.stages.evaluate import sparsity

    model, _ = load_model(tiny_model_dir)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(m.weight.numel() for m in linears)
    assert sparsity(model) == {"sparsity": 0.0, "sparsity_counted_weights": total}
    with torch.no_grad():
        linears[0].weight[: linears[0].weight.shape[0] // 2] = 0
    assert sparsity(model)["sparsity"] == pytest.approx((linears[0].weight.numel() // 2) / total)


def test_latency_figures_are_positive_and_name_their_shapes(tiny):
    from llmpress.components.stages.evaluate.speed import latency

    model, _, _ = tiny
    figures = latency(model, batch_sizes=[1, 2], prompt_tokens=16, new_tokens=4, repeats=1, device="cpu")
    assert set(figures) == {
        "ttft_ms.b1.in16", "decode_ms_per_token.b1.in16.out4", "throughput_tok_s.b1.in16.out4",
        "ttft_ms.b2.in16", "decode_ms_per_token.b2.in16.out4", "throughput_tok_s.b2.in16.out4",
    }
    assert all(v > 0 and math.isfinite(v) for v in figures.values())


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir):
    """One real evaluation of the tiny model, then one with it as its own baseline."""
    from llmpress.components.data import DataSpec, load_texts
    from llmpress.components.stages.evaluate import EvaluateConfig, run

    data = DataSpec(source="builtin:pydoc-eval", num_samples=4, seq_len=32)
    config = EvaluateConfig(latency={"batch_sizes": [1], "prompt_tokens": 16, "new_tokens": 4, "repeats": 1}, sample_tokens=8)
    base = run(tiny_model_dir, config, data, load_texts(data))
    return base, run(tiny_model_dir, config, data, load_texts(data), baseline=base)


def test_evaluation_labels_every_figure_with_device_and_measurement(evaluated):
    base, _ = evaluated
    assert base["eval_device"].startswith("cpu: ") and "threads" in base["eval_device"]
    assert base["eval_peak_memory_kind"] == "process peak RSS" and base["eval_peak_memory_bytes"] > 0
    assert (base["eval_seq_len"], base["eval_stride"], base["eval_windows"]) == (32, 32, 4)
    assert base["ttft_ms.b1.in16"] > 0 and base["throughput_tok_s.b1.in16.out4"] > 0
    assert base["size_bytes"] > 0 and base["num_parameters"] > 0 and base["sparsity"] == 0.0
    assert base["generation_sample"].startswith("The following example shows how to")


def test_an_evaluation_without_the_sparsity_count_has_no_sparsity_figure(tiny_model_dir):
    from llmpress.components.data import DataSpec, load_texts
    from llmpress.components.stages.evaluate import EvaluateConfig, run

    data = DataSpec(source="builtin:pydoc-eval", num_samples=2, seq_len=32)
    metrics = run(tiny_model_dir, EvaluateConfig(latency={"batch_sizes": []}, sample_tokens=0, count_sparsity=False), data, load_texts(data))
    assert not {"sparsity", "sparsity_counted_weights"} & set(metrics)
    assert metrics["perplexity"] > 0 and metrics["size_bytes"] > 0


def test_cpu_evaluation_computes_in_float32_unless_the_cpu_has_native_bf16(evaluated):
    from llmpress.components.stages.evaluate import compute_dtype

    base, _ = evaluated  # the tiny model is stored in bfloat16
    flags = open("/proc/cpuinfo").read().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert base["eval_dtype"] == ("bfloat16" if native else "float32")
    assert compute_dtype("cuda") == "auto"


def test_every_shared_figure_gets_a_ratio_to_the_baseline(evaluated):
    base, again = evaluated
    assert again["perplexity_ratio"] == pytest.approx(1.0)  # same model, deterministic
    assert again["size_bytes_ratio"] == 1.0 and again["num_parameters_ratio"] == 1.0
    assert again["ttft_ms.b1.in16_ratio"] == pytest.approx(again["ttft_ms.b1.in16"] / base["ttft_ms.b1.in16"])
    assert "throughput_tok_s.b1.in16.out4_ratio" in again
    # bookkeeping and labels are not figures to compare
    assert not {"eval_tokens_ratio", "eval_stride_ratio", "eval_device_ratio", "generation_sample_ratio", "sparsity_ratio"} & set(again)


@pytest.mark.parametrize(
    ("evaluation", "line"),
    [
        ({"latency": {"batch_sizes": [0, 4]}}, "evaluation.latency.batch_sizes[0]: 0 — Input should be greater than or equal to 1"),
        ({"latency": {"new_tokens": 1}}, "evaluation.latency.new_tokens: 1 — Input should be greater than 1"),
        ({"sample_tokens": -1}, "evaluation.sample_tokens: -1 — Input should be greater than or equal to 0"),
        ({"task_limit": 0}, "evaluation.task_limit: 0 — Input should be greater than 0"),
        ({"tasks": "hellaswag"}, "evaluation.tasks: 'hellaswag' — Input should be a valid list"),
    ],
    ids=["batch-size-0", "one-new-token", "negative-sample", "zero-limit", "tasks-not-a-list"],
)
def test_bad_evaluation_settings_are_one_clear_line(evaluation, line):
    from llmpress.components.errors import UserError
    from llmpress.recipe import parse_recipe

    with pytest.raises(UserError) as err:
        parse_recipe(tiny_recipe(evaluation=evaluation))
    assert err.value.problems == [line]


def test_latency_longer_than_the_context_is_a_user_error(tiny_model_dir):
    from llmpress.components.data import DataSpec, load_texts
    from llmpress.components.errors import UserError
    from llmpress.components.stages.evaluate import EvaluateConfig, run

    data = DataSpec(source="builtin:pydoc-eval", num_samples=1, seq_len=16)
    config = EvaluateConfig(latency={"batch_sizes": [1], "prompt_tokens": 100_000}, sample_tokens=0)
    with pytest.raises(UserError) as err:
        run(tiny_model_dir, config, data, load_texts(data), field="stages.check")
    (line,) = err.value.problems
    assert line.startswith("stages.check.latency.prompt_tokens: 100000 — prompt_tokens + new_tokens must fit the model's context of ")


def test_a_model_larger_than_the_device_s_free_memory_is_one_line_before_it_loads(tiny_model_dir, monkeypatch):
    from llmpress.components.data import DataSpec, load_texts
    from llmpress.components.errors import UserError
    from llmpress.components.stages import evaluate
    from llmpress.components.stages.evaluate import EvaluateConfig, run

    monkeypatch.setattr(evaluate, "free_bytes", lambda device: 2**20)  # a device with 1 MiB free
    monkeypatch.setattr(evaluate, "load_model", lambda *args, **kwargs: pytest.fail("loaded the model"))
    data = DataSpec(source="builtin:pydoc-eval", num_samples=1, seq_len=16)
    with pytest.raises(UserError) as err:
        run(tiny_model_dir, EvaluateConfig(sample_tokens=0), data, load_texts(data), field="stages.check")
    assert err.value.problems == [
        "stages.check.device: 'auto' — the model's 0.0 GiB of weights and 1.0 GiB of headroom for a forward pass exceed the 0.0 GiB free "
        "on cpu; give the step a GPU with more memory (resources), or device: cpu"]


# --- ratios only against a baseline measured the same way ------------------------------------

def evaluation_step(model_dir, evals, target, data=None):
    """One pipeline evaluation step (steps.evaluate, as the KFP shell calls it) on the tiny model."""
    import json

    from llmpress.components.kubeflow import steps
    from llmpress.components.stages.evaluate import EvaluateConfig

    config = EvaluateConfig(sample_tokens=0, data=data).model_dump_json()
    main_data = json.dumps({"source": "builtin:pydoc-eval", "num_samples": 4, "seq_len": 32})
    records, metrics = steps.evaluate(str(model_dir), config, main_data, target, "evaluation", evals)
    return records, metrics


def test_an_evaluation_on_other_text_is_compared_with_the_baseline_on_that_text(tiny_model_dir):
    own = {"source": "builtin:pydoc-train", "num_samples": 4, "seq_len": 32}
    evals, base = evaluation_step(tiny_model_dir, "", "baseline")
    evals, base_on_own = evaluation_step(tiny_model_dir, evals, "baseline", own)
    _, stage = evaluation_step(tiny_model_dir, evals, "heldout", own)
    assert stage["perplexity"] != pytest.approx(base["perplexity"], rel=0.01)  # the two texts differ
    assert stage["perplexity_ratio"] == pytest.approx(1.0)  # the same model on the same text
    assert stage["baseline_perplexity"] == base_on_own["perplexity"]


def test_an_evaluation_without_a_baseline_on_its_text_gets_no_ratio(tiny_model_dir):
    evals, _ = evaluation_step(tiny_model_dir, "", "baseline")
    _, stage = evaluation_step(tiny_model_dir, evals, "heldout", {"source": "builtin:pydoc-train", "num_samples": 4, "seq_len": 32})
    assert "perplexity_ratio" not in stage and stage["perplexity"] > 1


def test_the_pipeline_measures_the_baseline_on_an_evaluate_stage_s_own_text():
    from llmpress.pipeline import build_pipeline
    from llmpress.recipe import parse_recipe

    own = {"source": "builtin:pydoc-train", "num_samples": 4, "seq_len": 32}
    recipe = parse_recipe(tiny_recipe(stages=[{"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16"},
                                              {"name": "same", "kind": "evaluate"}, {"name": "heldout", "kind": "evaluate", "data": own}]))
    tasks = build_pipeline(recipe).pipeline_spec.root.dag.tasks
    names = sorted(task.task_info.name for task in tasks.values())
    assert "evaluate-baseline-for-heldout" in names and "evaluate-baseline-for-same" not in names  # same settings: the main baseline serves
