"""The prune stage: sparsity as promised (per layer, 2:4 exactly, kept through GPTQ),
structured removal into a smaller dense model that plain transformers reloads and that
computes what the masked original computes, and one clear line for bad options."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_recipe
from llmpress.cli import main
from llmpress.components.data import DataSpec, calibration_samples, load_texts
from llmpress.components.errors import UserError
from llmpress.components.models.io import load_model
from llmpress.components.models.sparsity import decoder_layers, linear_weights, nm_violations
from llmpress.components.stages import prune
from llmpress.components.stages.prune import PruneConfig
from llmpress.components.stages.prune import structured as prune_structured

CALIBRATION = DataSpec(source="builtin:pydoc-train", num_samples=8, seq_len=64)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return load_texts(CALIBRATION)


@pytest.fixture(scope="module")
def samples(tiny_model_dir, texts) -> list[list[int]]:
    _, tokenizer = load_model(tiny_model_dir)
    return calibration_samples(CALIBRATION, tokenizer, texts)


def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32")[0]


def sparsity_of(linear) -> float:
    return float((linear.weight == 0).float().mean())


@pytest.fixture(scope="module")
def sparsegpt_2of4(tiny_model_dir, texts, tmp_path_factory):
    """One full stage run: SparseGPT 2:4 on the tiny model, saved and reloaded."""
    out = tmp_path_factory.mktemp("prune") / "sparsegpt-2of4"
    metrics = prune.run(tiny_model_dir, out, PruneConfig(method="sparsegpt", mask_structure="2:4"), CALIBRATION, texts)
    return out, metrics


# --- unstructured and N:M ------------------------------------------------------------------

def test_sparsegpt_2of4_has_two_zeros_in_every_four_weights(sparsegpt_2of4):
    out, metrics = sparsegpt_2of4
    model, _ = load_model(out)
    linears = list(linear_weights(decoder_layers(model)))
    assert len(linears) == 14
    for name, linear in linears:
        assert nm_violations(linear.weight, 2, 4) == 0, name
        assert sparsity_of(linear) == 0.5, name
    assert metrics["nm_violations"] == 0
    assert [entry["sparsity"] for entry in metrics["layers"]] == [0.5, 0.5]


def test_stage_reports_parameters_size_and_latency_before_and_after(sparsegpt_2of4):
    out, metrics = sparsegpt_2of4
    decoder_weights = sum(lin.weight.numel() for _, lin in linear_weights(decoder_layers(load_model(out)[0])))
    assert metrics["num_parameters"] == metrics["num_parameters_before"]
    assert metrics["nonzero_parameters"] == metrics["num_parameters"] - decoder_weights // 2
    assert metrics["size_bytes"] > 0 and metrics["size_bytes_before"] > 0
    assert metrics["latency_ms_before"] > 0 and metrics["latency_ms_after"] > 0
    assert metrics["forward_speedup"] == pytest.approx(metrics["latency_ms_before"] / metrics["latency_ms_after"])
    json.dumps(metrics)  # the nested per-layer list travels as JSON
    assert json.loads((out / "pruning.json").read_text())["method"] == "sparsegpt"


def test_stage_times_the_work_a_direct_call_also_does_apart_from_its_checks(sparsegpt_2of4):
    _, metrics = sparsegpt_2of4
    assert metrics["prune_time_s"] == pytest.approx(metrics["load_time_s"] + metrics["calibrate_time_s"] + metrics["save_time_s"])
    assert metrics["calibrate_time_s"] > 0 and metrics["save_time_s"] > 0 and metrics["measure_time_s"] > 0
    assert metrics["prune_time_s"] + metrics["measure_time_s"] <= metrics["wall_time_s"]


def test_stage_reloads_its_output_once_for_the_self_check_and_the_figures_after(tiny_model_dir, texts, tmp_path, monkeypatch):
    loaded = []
    real_load = prune.load_model

    def counting_load(model_dir, **kwargs):
        loaded.append(str(model_dir))
        return real_load(model_dir, **kwargs)

    from llmpress.components.models import io

    monkeypatch.setattr(prune, "load_model", counting_load)
    monkeypatch.setattr(io, "load_model", counting_load)  # where a self-check would load from
    prune.run(tiny_model_dir, tmp_path / "out", PruneConfig(method="magnitude"), CALIBRATION, texts)
    assert loaded.count(str(tmp_path / "out")) == 1  # at 8B each reload is 16 GB read and placed


def test_pruned_model_is_freed_before_its_output_is_reloaded(tiny_model_dir, texts, tmp_path, monkeypatch):
    # llm-compressor's session and its trace's registrations in torch.fx kept it alive (at 8B: 16 GB)
    import gc
    import weakref

    calibrated, alive_at_reload = [], []
    real_oneshot, real_load = prune._oneshot, prune.load_model

    def recording_oneshot(model, *args):
        # every module, not only the top one: the trace's namespace held the inner model alone
        calibrated.extend(weakref.ref(module) for module in model.modules())
        return real_oneshot(model, *args)

    def checking_load(model_dir, **kwargs):
        if str(model_dir) == str(tmp_path / "out"):
            gc.collect()
            alive_at_reload.append(sorted({type(ref()).__name__ for ref in calibrated if ref() is not None}))
        return real_load(model_dir, **kwargs)

    monkeypatch.setattr(prune, "_oneshot", recording_oneshot)
    monkeypatch.setattr(prune, "load_model", checking_load)
    prune.run(tiny_model_dir, tmp_path / "out", PruneConfig(method="wanda", sparsity=0.5), CALIBRATION, texts)
    assert alive_at_reload == [[]]


def test_2of4_stays_2of4_after_gptq_w4a16(sparsegpt_2of4, texts, tmp_path):
    from llmpress.components.stages import quantize
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    pruned, _ = sparsegpt_2of4
    quantize.run(pruned, tmp_path / "w4a16", quantize.QuantizeConfig(scheme="gptq-w4a16", group_size=32), CALIBRATION, texts)
    # the int4 weights as the dense matrix they encode
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "w4a16", quantization_config=CompressedTensorsConfig(run_compressed=False))
    linears = list(linear_weights(decoder_layers(model)))
    assert len(linears) == 14
    for name, linear in linears:
        assert nm_violations(linear.weight, 2, 4) == 0, name


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_per_layer_schedule_gives_each_layer_its_sparsity(method, tiny_model_dir, samples):
    model = tiny(tiny_model_dir)
    metrics, _ = prune._unstructured(model, PruneConfig(method=method, layer_sparsity=[0.3, 0.6]), samples)
    for target, layer in zip([0.3, 0.6], decoder_layers(model), strict=True):
        for name, linear in linear_weights(layer):
            # counts are whole weights: at most one weight per row away from the target
            assert sparsity_of(linear) == pytest.approx(target, abs=1 / linear.in_features), name
    assert [entry["target"] for entry in metrics["layers"]] == [0.3, 0.6]


def test_kept_layers_stay_bit_identical(tiny_model_dir, samples):
    model, original = tiny(tiny_model_dir), tiny(tiny_model_dir)
    prune._unstructured(model, PruneConfig(method="wanda", mask_structure="2:4", keep_layers=[0]), samples)
    kept, pruned = decoder_layers(model)
    for (name, linear), (_, before) in zip(linear_weights(kept), linear_weights(decoder_layers(original)[0]), strict=True):
        assert torch.equal(linear.weight, before.weight), name
    assert all(nm_violations(lin.weight, 2, 4) == 0 for _, lin in linear_weights(pruned))


def test_magnitude_2of4_zeroes_the_two_smallest_of_every_four(tiny_model_dir):
    model, original = tiny(tiny_model_dir), tiny(tiny_model_dir)
    prune._unstructured(model, PruneConfig(method="magnitude", mask_structure="2:4"), [])
    after = decoder_layers(model)[0].mlp.up_proj.weight.reshape(-1, 4)
    before = decoder_layers(original)[0].mlp.up_proj.weight.reshape(-1, 4)
    assert ((after != 0).sum(1) == 2).all()
    # every kept weight is at least as large as every zeroed one of its group (ties either way)
    kept_min = before.abs().masked_fill(after == 0, float("inf")).min(1).values
    pruned_max = before.abs().masked_fill(after != 0, -1.0).max(1).values
    assert (kept_min >= pruned_max).all()


def test_ignored_linears_stay_dense(tiny_model_dir):
    model = tiny(tiny_model_dir)
    metrics, _ = prune._unstructured(model, PruneConfig(method="magnitude", sparsity=0.5, ignore=["re:.*down_proj"]), [])
    for name, linear in linear_weights(decoder_layers(model)):
        assert sparsity_of(linear) == (0.0 if name.endswith("down_proj") else pytest.approx(0.5, abs=0.01)), name
    assert [entry["sparsity"] for entry in metrics["layers"]] == [pytest.approx(0.5, abs=0.01)] * 2


def test_a_schedule_of_the_wrong_length_is_one_user_error(tiny_model_dir):
    with pytest.raises(UserError) as err:
        prune.layer_schedule(PruneConfig(method="wanda", layer_sparsity=[0.5]), num_layers=2)
    assert err.value.problems == ["layer_sparsity: [0.5] — needs one value per decoder layer; this model has 2"]


# --- structured ------------------------------------------------------------------------------

def random_model(model_type: str):
    """A tiny random model of a real architecture with grouped-query attention: 8 query
    heads in 4 key/value groups (Qwen2 adds q/k/v biases)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                  num_key_value_heads=4, max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", prune_structured.SUPPORTED_MODEL_TYPES)
def test_structured_model_is_smaller_reloads_and_computes_what_the_masked_original_does(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model = random_model(model_type)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    kept = prune_structured.choose(prune_structured.importance(model, ids.tolist(), "cpu"), groups_kept=2, channels_kept=64)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, (groups, channels) in zip(decoder_layers(masked), kept, strict=True):
            for g in set(range(4)) - set(groups):  # group g holds query heads 2g, 2g+1 (head_dim 8)
                layer.self_attn.o_proj.weight[:, g * 16 : (g + 1) * 16] = 0
            layer.mlp.down_proj.weight[:, sorted(set(range(96)) - set(channels))] = 0
    prune_structured.shrink(model, kept)
    model.save_pretrained(tmp_path)
    smaller = AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    cfg = smaller.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (4, 2, 8, 64)
    attn, mlp = smaller.model.layers[1].self_attn, smaller.model.layers[1].mlp
    assert (attn.q_proj.weight.shape, attn.k_proj.weight.shape, attn.o_proj.weight.shape) == ((32, 64), (16, 64), (64, 32))
    assert (mlp.gate_proj.weight.shape, mlp.down_proj.weight.shape) == ((64, 64), (64, 64))
    with torch.no_grad():
        expected, got, unpruned = masked(ids).logits, smaller(ids).logits, random_model(model_type)(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unpruned, expected, atol=1e-3)  # the removal did change something


def test_importance_removes_silent_heads_and_channels_first():
    model = random_model("llama")
    layer = decoder_layers(model)[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight[:, 32:48] = 0  # group 2 adds nothing to the residual stream
        layer.mlp.down_proj.weight[:, [5, 50]] = 0
    (groups, channels), _ = prune_structured.importance(model, [[1, 2, 3, 4] * 8] * 2, "cpu")
    assert groups.argmin() == 2 and groups[2] == 0
    assert set(channels.argsort()[:2].tolist()) == {5, 50}


def test_structured_stage_run_on_the_tiny_model(tiny_model_dir, texts, tmp_path):
    metrics = prune.run(tiny_model_dir, tmp_path, PruneConfig(method="structured", ffn_sparsity=0.25), CALIBRATION, texts)
    assert (metrics["intermediate_size_before"], metrics["intermediate_size_after"]) == (384, 288)
    # the tiny model has one key/value head: attention cannot lose a group
    assert metrics["kv_heads_after"] == metrics["kv_heads_before"] == 1
    removed = 2 * 96 * 3 * 128  # two layers, 96 channels, gate + up + down rows/columns of width 128
    assert metrics["num_parameters"] == metrics["num_parameters_before"] - removed
    assert metrics["size_bytes"] < metrics["size_bytes_before"]
    assert [entry["removed_channels"] for entry in metrics["layers"]] == [96, 96]
    detail = json.loads((tmp_path / "pruning.json").read_text())["layers"]
    assert [len(entry["kept_channels"]) for entry in detail] == [288, 288]


def test_target_parameters_lands_at_or_just_below_the_target():
    model = random_model("llama")
    total = sum(p.numel() for p in model.parameters())
    groups, channels = prune_structured.plan(model, total, 0.5, None, total - 20_000, 8)
    group_cost, channel_cost = prune_structured.unit_costs(model, prune_structured.model_shape(model))
    after = total - 2 * (4 - groups) * group_cost - 2 * (96 - channels) * channel_cost
    assert groups == 2 and channels % 8 == 0
    assert after <= total - 20_000 < after + 2 * 8 * channel_cost


def test_an_unreachable_parameter_target_is_one_user_error():
    model = random_model("llama")
    with pytest.raises(UserError) as err:
        prune_structured.plan(model, 100_000, 0.0, None, 1_000, 8)
    (line,) = err.value.problems
    assert line.startswith("target_parameters: 1000 — unreachable: at least ")


# --- recipe validation -----------------------------------------------------------------------

def prune_stage(**fields):
    return {"name": "prune", "kind": "prune", **fields}


BAD_OPTIONS = {  # noqa: E501 (one case a line reads best)
    "unknown-method": (prune_stage(method="sparsify"), "stages[0].method: 'sparsify' — Input should be 'sparsegpt', 'wanda', 'magnitude' or 'structured'"),
    "sparsity-above-one": (prune_stage(method="wanda", sparsity=1.5), "stages[0].sparsity: 1.5 — Input should be less than 1"),
    "bad-nm": (prune_stage(method="sparsegpt", mask_structure="4:2"), "stages[0].mask_structure: '4:2' — allowed: '0:0' (unstructured) or 'N:M'"),
    "nm-and-other-sparsity": (prune_stage(method="sparsegpt", sparsity=0.7, mask_structure="2:4"), "stages[0].mask_structure: '2:4' — fixes the sparsity at 0.5"),  # noqa: E501
    "nm-on-structured": (prune_stage(method="structured", mask_structure="2:4"), "stages[0].mask_structure: '2:4' — only for methods sparsegpt, wanda, magnitude"),  # noqa: E501
    "keep-layers-on-structured": (prune_stage(method="structured", keep_layers=[0]), "stages[0].keep_layers: [0] — only for methods sparsegpt, wanda, magnitude"),  # noqa: E501
    "ffn-on-sparsegpt": (prune_stage(method="sparsegpt", ffn_sparsity=0.3), "stages[0].ffn_sparsity: 0.3 — only for method structured (method is 'sparsegpt')"),
    "layer-sparsity-range": (prune_stage(method="wanda", layer_sparsity=[0.5, 1.2]), "stages[0].layer_sparsity: [0.5, 1.2] — one value per decoder layer, each in [0, 1)"),  # noqa: E501
    "target-and-ffn": (prune_stage(method="structured", ffn_sparsity=0.2, target_parameters=1000), "stages[0].target_parameters: 1000 — sets the FFN width"),
    "structured-without-amount": (prune_stage(method="structured"), "— method 'structured' needs how much to remove: sparsity, attention_sparsity, ffn_sparsity or target_parameters"),  # noqa: E501
    "negative-layer": (prune_stage(method="magnitude", keep_layers=[-1]), "stages[0].keep_layers: [-1] — decoder layer indices, 0 or more"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_prune_option_gets_one_clear_line_and_exit_2(case, write_recipe, capsys):
    stage, expected = BAD_OPTIONS[case]
    assert main(["validate", str(write_recipe(tiny_recipe(stages=[stage])))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0], lines[0]


def test_prune_then_quantize_is_a_valid_recipe(write_recipe, capsys):
    stages = [prune_stage(method="sparsegpt", mask_structure="2:4"), {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16"}]
    assert main(["validate", str(write_recipe(tiny_recipe(stages=stages)))]) == 0
    assert capsys.readouterr().out.strip() == "ok"


@pytest.mark.slow
def test_local_run_of_prune_then_quantize_keeps_2of4(write_recipe, tmp_path):
    """The whole pipeline (kfp.local, MLflow): SparseGPT 2:4 then GPTQ W4A16 on the tiny model."""
    import os

    from conftest import run_cli
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    stages = [prune_stage(method="sparsegpt", mask_structure="2:4"), {"name": "gptq", "kind": "quantize", "scheme": "gptq-w4a16", "group_size": 32}]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = run_cli("run", str(write_recipe(tiny_recipe(name="prune-gptq", stages=stages))), "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pruned, quantized = json.loads((tmp_path / "out" / "results.json").read_text())["stages"]
    assert pruned["metrics"]["nm_violations"] == 0 and pruned["metrics"]["perplexity"] > 1
    assert quantized["metrics"]["size_bytes"] < pruned["metrics"]["size_bytes"]
    outputs = (tmp_path / "out" / "artifacts").glob("*/run-stage*/model_out")
    (model_dir,) = [p for p in outputs if "quantization_config" in json.loads((p / "config.json").read_text())]
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=CompressedTensorsConfig(run_compressed=False))
    assert all(nm_violations(lin.weight, 2, 4) == 0 for _, lin in linear_weights(decoder_layers(model)))


def test_structured_amount_that_rounds_far_from_what_was_asked_is_refused_before_scoring(tiny_model_dir, texts, tmp_path):
    # the tiny model has one key/value group per layer: no share of it can be removed
    with pytest.raises(UserError) as err:
        prune.run(tiny_model_dir, tmp_path / "out", PruneConfig(method="structured", sparsity=0.25), CALIBRATION, texts)
    assert err.value.problems == ["sparsity: 0.25 — this model has 1 key/value groups per layer, removed whole: 0 of 1 (0) is the nearest, "
                                  "further than 0.05 from what was asked; fractions this model allows: 0"]
    assert not (tmp_path / "out").exists()


def test_structured_amounts_are_reported_as_asked_and_as_removed(tiny_model_dir, texts, tmp_path):
    metrics = prune.run(tiny_model_dir, tmp_path, PruneConfig(method="structured", ffn_sparsity=0.3, channel_multiple=64), CALIBRATION, texts)
    assert (metrics["intermediate_size_before"], metrics["intermediate_size_after"]) == (384, 256)  # whole multiples of 64
    assert metrics["ffn_sparsity_asked"] == 0.3 and metrics["ffn_sparsity_removed"] == pytest.approx(1 / 3)
    assert (metrics["attention_sparsity_asked"], metrics["attention_sparsity_removed"]) == (0.0, 0.0)


def test_pruned_model_reports_its_bits_per_parameter(tiny_model_dir, texts, tmp_path):
    metrics = prune.run(tiny_model_dir, tmp_path, PruneConfig(method="magnitude", sparsity=0.5), CALIBRATION, texts)
    assert metrics["bits_per_parameter"] == pytest.approx(8 * metrics["size_bytes"] / metrics["num_parameters"])
    assert 15.9 < metrics["bits_per_parameter"] < 16.5  # stored dense in bf16: zeros cost as much as any weight
