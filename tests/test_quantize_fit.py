"""Where the quantize stage needs the whole 16-bit model on its device. The self-check's
reload (transformers decompresses llm-compressor checkpoints when it loads them) runs
there when it fits, else on the CPU, said in the log, the metrics and the report.
auto_ignore's sensitivity pass has no such way out: a model that cannot fit is one line
before anything loads."""

from __future__ import annotations

import logging

import pytest
from llmpress.components.data import DataSpec, load_texts
from llmpress.components.errors import UserError
from llmpress.components.models import measure
from llmpress.components.models.io import loaded_bytes, weights_size_bytes
from llmpress.components.stages import quantize

CALIBRATION = DataSpec(source="builtin:pydoc-train", num_samples=8, seq_len=64)


def test_the_reload_is_sized_by_its_16bit_matrices_not_the_compressed_files(tiny_model_dir, tmp_path, monkeypatch):
    metrics = quantize.run(tiny_model_dir, tmp_path / "out", quantize.QuantizeConfig(scheme="rtn-w4a16"), CALIBRATION, [])
    weights = 2 * metrics["num_parameters"]  # about three times the W4A16 files
    assert weights_size_bytes(tmp_path / "out") < weights / 2
    monkeypatch.setattr(quantize, "free_bytes", lambda device: weights + measure.headroom_bytes(weights))
    assert quantize.self_check_unfit(tmp_path / "out", "rtn-w4a16", "cuda") is None
    monkeypatch.setattr(quantize, "free_bytes", lambda device: weights + measure.headroom_bytes(weights) - 1)
    assert quantize.self_check_unfit(tmp_path / "out", "rtn-w4a16", "cuda").endswith("GiB free on cuda")


@pytest.mark.parametrize("scheme", ["rtn-w4a16", "fp8"])
def test_a_compressed_output_loads_as_its_dense_16bit_matrices(scheme, tiny_model_dir, tmp_path):
    metrics = quantize.run(tiny_model_dir, tmp_path / "out", quantize.QuantizeConfig(scheme=scheme), CALIBRATION, [])
    assert weights_size_bytes(tmp_path / "out") < 0.7 * weights_size_bytes(tiny_model_dir)
    assert loaded_bytes(tmp_path / "out") == 2 * metrics["num_parameters"]  # every parameter of the bf16 model, packed ones unpacked


def test_an_uncompressed_checkpoint_loads_as_stored(tiny_model_dir):
    assert loaded_bytes(tiny_model_dir) == weights_size_bytes(tiny_model_dir)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_bitsandbytes_outputs_reload_on_the_device_they_were_built_on(scheme, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(quantize, "free_bytes", lambda device: 0)
    assert quantize.self_check_unfit(tiny_model_dir, scheme, "cuda") is None


def test_an_output_whose_reload_does_not_fit_is_checked_on_the_cpu_and_says_why(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(quantize, "free_bytes", lambda device: 2**20)  # a device with 1 MiB free
    with caplog.at_level(logging.INFO, logger="llmpress"):
        metrics = quantize.run(tiny_model_dir, tmp_path / "out", quantize.QuantizeConfig(scheme="fp8"), CALIBRATION, [])
    reason = metrics["self_check_on_cpu"]
    assert reason == "the model's 0.0 GiB of weights and 1.0 GiB of headroom for a forward pass exceed the 0.0 GiB free on cpu"
    assert [r.getMessage() for r in caplog.records if "self-check runs on the CPU" in r.getMessage()] == [
        f"quantize: the output's self-check runs on the CPU: its reload is 16-bit and does not fit cpu: {reason}"]
    assert any("reloaded with plain transformers and generated" in r.getMessage() for r in caplog.records)


def test_an_output_whose_reload_fits_reports_nothing_about_it(tiny_model_dir, tmp_path):
    metrics = quantize.run(tiny_model_dir, tmp_path / "out", quantize.QuantizeConfig(scheme="fp8"), CALIBRATION, [])
    assert "self_check_on_cpu" not in metrics and metrics["self_check_time_s"] > 0


@pytest.mark.gpu
def test_on_a_gpu_too_small_for_the_reload_the_check_runs_on_the_cpu(tiny_model_dir, tmp_path, monkeypatch):
    devices: list[str] = []
    real_check = quantize.self_check
    monkeypatch.setattr(quantize, "free_bytes", lambda device: 2**20)
    monkeypatch.setattr(quantize, "self_check", lambda out, device: devices.append(device) or real_check(out, device))
    metrics = quantize.run(tiny_model_dir, tmp_path / "out", quantize.QuantizeConfig(scheme="gptq-w4a16", device="cuda"), CALIBRATION,
                           load_texts(CALIBRATION))
    assert devices == ["cpu"] and metrics["self_check_on_cpu"].endswith("GiB free on cuda")


def test_auto_ignore_on_a_device_too_small_for_the_model_is_one_line_before_it_loads(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "free_bytes", lambda device: 2**20)
    monkeypatch.setattr(quantize, "load_model", lambda *args, **kwargs: pytest.fail("loaded the model"))
    config = quantize.QuantizeConfig(scheme="nf4", device="cpu", auto_ignore={"budget": 6.0})
    with pytest.raises(UserError) as err:
        quantize.run(tiny_model_dir, tmp_path, config, CALIBRATION, load_texts(CALIBRATION))
    assert err.value.problems == [
        "auto_ignore: {'budget': 6.0, 'samples': 8} — its sensitivity pass needs the whole 16-bit model on cpu: the model's 0.0 GiB of "
        "weights and 1.0 GiB of headroom for a forward pass exceed the 0.0 GiB free on cpu; drop auto_ignore (name the layers in ignore) "
        "or give the step more GPU memory"]


# --- hostile checkpoints: loaded_bytes reads config.json and safetensors headers ---------------

COMPRESSED = {"quantization_config": {"quant_method": "compressed-tensors"}, "dtype": "bfloat16"}


def checkpoint(folder, config, tensors=None, raw: bytes | None = None):
    """A model folder with ``config`` (a dict, or raw text) and one weight file."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if raw is not None:
        (folder / "model.safetensors").write_bytes(raw)
    else:
        save_file(tensors or {"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    return folder


def test_a_packed_matrix_counts_as_the_shape_it_declares(tmp_path):
    import torch

    folder = checkpoint(tmp_path / "m", COMPRESSED, {"a.weight_packed": torch.zeros(4, 2, dtype=torch.int32),
                                                     "a.weight_shape": torch.tensor([4, 16]), "a.weight_scale": torch.zeros(4, 1)})
    assert loaded_bytes(folder) == 4 * 16 * 2


def test_a_declared_shape_that_is_not_two_numbers_is_never_read(tmp_path):
    import torch

    # had its 100,000 zeros been read as the shape, the matrix would count 0 elements
    folder = checkpoint(tmp_path / "m", COMPRESSED, {"a.weight_packed": torch.zeros(4, 2, dtype=torch.int32),
                                                     "a.weight_shape": torch.zeros(100_000, dtype=torch.int64)})
    assert loaded_bytes(folder) == 4 * 2 * 2  # the packed tensor counted as stored


@pytest.mark.parametrize(("config", "problem"), [
    ("{not json", "config.json is not valid JSON"),
    ("[1, 2]", "config.json holds a JSON list, not an object"),
    ('"a string"', "config.json holds a JSON str, not an object"),
    (b"\xff\xfe{".decode("latin-1"), "config.json is not valid JSON"),
])
def test_a_config_that_is_not_a_json_object_is_one_line(config, problem, tmp_path):
    folder = checkpoint(tmp_path / "m", config)
    with pytest.raises(UserError) as err:
        loaded_bytes(folder, field="stages[0]")
    assert err.value.problems == [f"stages[0]: {str(folder)!r} — {problem}"]


def test_a_config_far_larger_than_any_model_s_is_refused_unread(tmp_path):
    folder = checkpoint(tmp_path / "m", "{}")
    (folder / "config.json").write_bytes(b" " * (4 * 2**20 + 1))
    with pytest.raises(UserError) as err:
        loaded_bytes(folder)
    assert err.value.problems[0].endswith(f"config.json is {4 * 2**20 + 1} bytes; at most {4 * 2**20} are read (a model's is a few KB)")


def test_a_weight_file_that_is_not_safetensors_is_one_line(tmp_path):
    folder = checkpoint(tmp_path / "m", COMPRESSED, raw=b"\xff" * 64)
    with pytest.raises(UserError) as err:
        loaded_bytes(folder)
    (line,) = err.value.problems
    assert "model.safetensors is not a readable safetensors file" in line
