"""Where the prune stage keeps the model: on the CPU while sparsegpt, wanda and magnitude
prune it (llm-compressor onloads a layer at a time), on the device only for the latency
before and after, and only where it fits there."""

from __future__ import annotations

import json
import logging
import weakref

import pytest
import torch
from llmpress.components.data import DataSpec, load_texts
from llmpress.components.errors import UserError
from llmpress.components.models import measure
from llmpress.components.stages import prune
from llmpress.components.stages.prune import PruneConfig
from llmpress.components.stages.prune import latency as prune_latency

CALIBRATION = DataSpec(source="builtin:pydoc-train", num_samples=8, seq_len=64)
GIB = 2**30
LATENCY_KEYS = ("latency_ms_before", "latency_ms_after", "forward_speedup")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return load_texts(CALIBRATION)


@pytest.fixture
def calibrated_layer_homes():
    """Where each decoder layer oneshot calibrates lives between its onloads, recorded by
    a real forward pre-hook on every module while the block runs."""
    from compressed_tensors.offload import OffloadCache, get_offloaded_device

    homes: list[str] = []

    def record(module, _args):
        if isinstance(module._parameters, OffloadCache) and type(module).__name__.endswith("DecoderLayer"):
            homes.append(str(get_offloaded_device(module)))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    yield homes
    handle.remove()


# --- where the weights live ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_every_method_but_structured_keeps_the_model_on_the_cpu_of_a_gpu_stage(method):
    assert prune.weights_home(method, "cuda") == "cpu"


def test_structured_keeps_the_model_on_the_device_for_its_forward_passes():
    assert prune.weights_home("structured", "cuda") == "cuda"
    assert prune.weights_home("structured", "cpu") == "cpu"


def test_oneshot_calibrates_layers_that_live_on_the_cpu(tiny_model_dir, texts, tmp_path, calibrated_layer_homes):
    prune.run(tiny_model_dir, tmp_path / "out", PruneConfig(method="wanda"), CALIBRATION, texts)
    assert calibrated_layer_homes and set(calibrated_layer_homes) == {"cpu"}


def test_input_is_reloaded_for_its_latency_only_after_the_output_is_saved_and_the_pruned_model_freed(tiny_model_dir, texts, tmp_path, monkeypatch):
    pruned_modules, at_input_reload = [], []
    real_unstructured, real_load = prune._unstructured, prune_latency.load_model

    def recording_unstructured(model, *args):
        pruned_modules.extend(weakref.ref(module) for module in model.modules())
        return real_unstructured(model, *args)

    def checking_load(model_dir, **kwargs):
        # no gc.collect() here: the stage must have collected the pruned model (del alone leaves it in a cycle)
        at_input_reload.append(((tmp_path / "out" / "config.json").is_file(), sum(ref() is not None for ref in pruned_modules)))
        return real_load(model_dir, **kwargs)

    monkeypatch.setattr(prune, "_unstructured", recording_unstructured)
    monkeypatch.setattr(prune_latency, "load_model", checking_load)
    metrics = prune.run(tiny_model_dir, tmp_path / "out", PruneConfig(method="magnitude"), CALIBRATION, texts)
    assert at_input_reload == [(True, 0)]  # once: saved, and not one module of the pruned model left
    assert metrics["latency_ms_before"] > 0


def test_cuda_without_a_gpu_is_one_user_error_before_anything_is_loaded(tiny_model_dir, texts, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.setattr(prune, "load_model", lambda *args, **kwargs: pytest.fail("loaded a model"))
    with pytest.raises(UserError) as err:
        prune.run(tiny_model_dir, tmp_path / "out", PruneConfig(method="wanda", device="cuda"), CALIBRATION, texts)
    assert err.value.problems == ["device: 'cuda' — no CUDA device is visible to this step; use device: auto or cpu, or give the step a GPU"]


# --- whether the latency is measured ---------------------------------------------------------

def test_an_8b_model_fits_an_empty_h200_for_its_latency():
    assert measure.fits_on_device(16_060_522_496, 139 * GIB)


def test_a_70b_model_fits_an_empty_h200_but_not_one_that_holds_another_8b():
    weights = 141_107_412_992  # Llama-3-70B in bf16: 131.4 GiB; with headroom 135.0 GiB
    assert measure.fits_on_device(weights, 139 * GIB)
    assert not measure.fits_on_device(weights, (139 - 15) * GIB)


def test_headroom_is_a_gibibyte_and_two_percent_of_the_weights():
    weights = 50 * GIB
    assert measure.fits_on_device(weights, weights + GIB + GIB)
    assert not measure.fits_on_device(weights, weights + GIB + GIB - 1)


def test_the_cpu_sets_no_limit():
    assert measure.free_bytes("cpu") is None
    assert measure.unfit_reason(10**15, None, "cpu") is None


def test_an_unfit_reason_names_the_sizes_and_the_device():
    reason = measure.unfit_reason(141_107_412_992, 80 * GIB, "cuda")
    assert reason == "the model's 131.4 GiB of weights and 3.6 GiB of headroom for a forward pass exceed the 80.0 GiB free on cuda"


def test_a_model_too_large_for_the_device_is_pruned_and_checked_without_latency(tiny_model_dir, texts, tmp_path, monkeypatch, caplog):
    # a device with 1 MiB free: the tiny model's 1 MB of weights and the headroom do not fit
    monkeypatch.setattr(prune, "free_bytes", lambda device: 2**20)
    with caplog.at_level(logging.INFO, logger="llmpress"):
        metrics = prune.run(tiny_model_dir, tmp_path / "out", PruneConfig(method="magnitude"), CALIBRATION, texts)
    assert not any(key in metrics for key in LATENCY_KEYS)
    assert metrics["latency_skipped"].endswith("exceed the 0.0 GiB free on cpu")
    assert [r.getMessage() for r in caplog.records if "latency not measured" in r.getMessage()] == [
        f"prune: forward latency not measured: {metrics['latency_skipped']}; the output's self-check runs on the CPU"]
    assert metrics["decoder_sparsity"] == pytest.approx(0.5, abs=0.01) and metrics["nonzero_parameters"] < metrics["num_parameters"]


def test_structured_on_a_device_too_small_for_the_model_is_one_line_before_it_loads(tiny_model_dir, texts, tmp_path, monkeypatch):
    monkeypatch.setattr(prune, "free_bytes", lambda device: 2**20)  # a device with 1 MiB free
    monkeypatch.setattr(prune, "load_model", lambda *args, **kwargs: pytest.fail("loaded the model"))
    with pytest.raises(UserError) as err:
        prune.run(tiny_model_dir, tmp_path / "out", PruneConfig(method="structured", ffn_sparsity=0.25), CALIBRATION, texts)
    assert err.value.problems == [
        "method: 'structured' — structured pruning runs the whole model on cpu: the model's 0.0 GiB of weights and 1.0 GiB of headroom "
        "for a forward pass exceed the 0.0 GiB free on cpu; give the step more GPU memory, or use sparsegpt, wanda or magnitude "
        "(they keep the model on the CPU)"]


# --- on a GPU ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_pruning_on_cuda_holds_far_less_than_the_model_on_the_gpu(method, texts, tmp_path, calibrated_layer_homes):
    from llmpress.components.models.builtin import build_builtin

    model_dir = build_builtin("pydoc-llama-200m")  # 197M parameters, 394 MB of bf16
    metrics = prune.run(model_dir, tmp_path / "out", PruneConfig(method=method, device="cuda"), CALIBRATION, texts)
    # half the model, plus the Hessians SparseGPT needs whatever the model's depth: it
    # peaked at 206 MB on the H200, 52 % of this model (2026-11-30, call 13)
    hessians = one_layer_hessian_bytes(model_dir) if method == "sparsegpt" else 0
    assert 0 < metrics["peak_memory_bytes"] < metrics["size_bytes_before"] / 2 + hessians
    assert set(calibrated_layer_homes) == (set() if method == "magnitude" else {"cpu"})  # magnitude calibrates nothing
    assert all(metrics[key] > 0 for key in LATENCY_KEYS)  # 394 MB fits any GPU


def one_layer_hessian_bytes(model_dir) -> int:
    """SparseGPT's fp32 Hessians (inputs x inputs) of one decoder layer's seven Linears,
    which live on the GPU together while that layer is calibrated."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    return 4 * (6 * hidden**2 + inner**2)  # q, k, v, o, gate and up read `hidden` inputs; down reads `inner`
