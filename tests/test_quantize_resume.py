"""Quantize at scale, checked small: the output-size floor, the calibrated model written
once (the output is exactly what llm-compressor's own save writes), and a stage killed
while saving that reruns without calibrating again. fp8 (data-free, seconds on the
CPU) stands for every llm-compressor scheme: they share the persist and publish path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from llmpress.components.data import DataSpec, load_texts
from llmpress.components.stages import quantize
from llmpress.components.stages.quantize import resume
from llmpress.components.stages.quantize.floor import size_floor_bytes

CALIBRATION = DataSpec(source="builtin:pydoc-train", num_samples=8, seq_len=64)


@pytest.fixture(autouse=True)
def resume_root(tmp_path, monkeypatch):
    """Calibrated models go under this test's folder, not the user's cache."""
    monkeypatch.delenv("LLMPRESS_SCRATCH", raising=False)
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "resume"


def tensors(model_dir):
    from safetensors.torch import load_file

    found = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def test_size_floor_counts_packed_weights_scales_zero_points_and_16bit_rest():
    import torch

    model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 32, bias=False), torch.nn.LayerNorm(32), torch.nn.Linear(32, 10))
    # layer "1" at 4 bits in groups of 32: 2 groups per row, a 16-bit scale and a 4-bit zero point each
    quantized_bits = 32 * 64 * 4 + 32 * 2 * (16 + 4)
    rest_bits = 16 * (100 * 64 + 2 * 32 + 32 * 10 + 10)  # embedding, norm, the Linear kept 16-bit
    assert size_floor_bytes(model, ["1"], "gptq-w4a16", group_size=32, zero_points=True) == (quantized_bits + rest_bits) // 8
    # 8-bit schemes: one scale per output channel, no zero point
    assert size_floor_bytes(model, ["1", "3"], "fp8") == (32 * 64 * 8 + 32 * 16 + 10 * 32 * 8 + 10 * 16 + 16 * (100 * 64 + 2 * 32 + 10)) // 8


def test_size_floor_counts_a_tied_table_once():
    import torch

    model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 100, bias=False))
    model[1].weight = model[0].weight
    assert size_floor_bytes(model, [], "fp8") == 100 * 64 * 2


def test_output_is_within_three_percent_above_its_floor(tiny_model_dir, tmp_path):
    import torch
    from llmpress.components.models.io import load_model

    metrics = quantize.run(tiny_model_dir, tmp_path / "out", quantize.QuantizeConfig(scheme="fp8", device="cpu"), CALIBRATION, load_texts(CALIBRATION))
    assert metrics["size_floor_bytes"] <= metrics["size_bytes"]  # a floor, not an estimate
    assert metrics["size_over_floor"] == pytest.approx(metrics["size_bytes"] / metrics["size_floor_bytes"] - 1)
    assert metrics["size_over_floor"] < 0.03
    # an 8-bit scheme's floor has no zero points: every Linear but the head at 8 bits + a scale per row
    model, _ = load_model(tiny_model_dir)
    quantized = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name != "lm_head"]
    assert metrics["size_floor_bytes"] == size_floor_bytes(model, quantized, "fp8", zero_points=False)


def test_output_is_what_llmcompressors_own_save_writes(tiny_model_dir, tmp_path):
    import torch
    from llmpress.components.models.io import load_model, save_model

    config = quantize.QuantizeConfig(scheme="fp8", device="cpu")
    quantize.run(tiny_model_dir, tmp_path / "ours", config, CALIBRATION, load_texts(CALIBRATION))
    model, tokenizer = load_model(tiny_model_dir)
    quantize.oneshot_quantize(model, config, ["lm_head"], [])
    save_model(model, tokenizer, tmp_path / "theirs", save_compressed=True)

    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert (tmp_path / "ours" / "recipe.yaml").read_text() == (tmp_path / "theirs" / "recipe.yaml").read_text()


def test_calibrated_model_is_removed_once_the_stage_succeeded(tiny_model_dir, tmp_path, resume_root):
    metrics = quantize.run(tiny_model_dir, tmp_path / "out", quantize.QuantizeConfig(scheme="fp8", device="cpu"), CALIBRATION, load_texts(CALIBRATION))
    assert metrics["resumed"] == 0
    assert resume_root.is_dir() and not any(resume_root.iterdir())


KILLED_WHILE_SAVING = """
import os, signal, sys
from pathlib import Path
from llmpress.components.data import DataSpec, load_texts
from llmpress.components.stages import quantize
from llmpress.components.stages.quantize import resume

def publish_then_die(folder, out_dir):
    # the output half written: one weight file in place, then the process is gone
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    weights = next(folder.glob("*.safetensors"))
    Path(out_dir, weights.name).write_bytes(weights.read_bytes()[:1000])
    os.kill(os.getpid(), signal.SIGKILL)

resume.publish = publish_then_die
calibration = DataSpec(source="builtin:pydoc-train", num_samples=8, seq_len=64)
quantize.run(sys.argv[1], sys.argv[2], quantize.QuantizeConfig(scheme="fp8", device="cpu"), calibration, load_texts(calibration))
"""


def test_stage_killed_while_saving_reruns_without_calibrating(tiny_model_dir, tmp_path, resume_root, monkeypatch):
    import os
    import signal

    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WHILE_SAVING), str(tiny_model_dir), str(out)],
                            env=os.environ, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folders = [p for p in resume_root.iterdir() if p.is_dir()]
    assert folders and all(resume.completed(p) for p in folders)

    def no_second_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(quantize, "oneshot_quantize", no_second_calibration)
    monkeypatch.setattr(quantize, "load_model", no_second_calibration)
    metrics = quantize.run(tiny_model_dir, out, quantize.QuantizeConfig(scheme="fp8", device="cpu"), CALIBRATION, load_texts(CALIBRATION))
    assert metrics["resumed"] == 1
    monkeypatch.undo()
    clean = quantize.run(tiny_model_dir, tmp_path / "clean", quantize.QuantizeConfig(scheme="fp8", device="cpu"), CALIBRATION, load_texts(CALIBRATION))
    assert clean["resumed"] == 0 and metrics["size_bytes"] == clean["size_bytes"]
    import torch

    resumed, fresh = tensors(out), tensors(tmp_path / "clean")
    assert resumed.keys() == fresh.keys() and all(torch.equal(resumed[k], fresh[k]) for k in resumed)


def test_changed_settings_calibrate_afresh(tiny_model_dir, tmp_path, resume_root):
    texts = load_texts(CALIBRATION)
    one = resume.resume_key(tiny_model_dir, quantize.QuantizeConfig(scheme="fp8").model_dump(mode="json"), CALIBRATION.model_dump(mode="json"), texts)
    other_ignore = quantize.QuantizeConfig(scheme="fp8", ignore=["lm_head", "model.layers.0.mlp.down_proj"]).model_dump(mode="json")
    other_data = CALIBRATION.model_copy(update={"seed": 1}).model_dump(mode="json")
    keys = {one, resume.resume_key(tiny_model_dir, other_ignore, CALIBRATION.model_dump(mode="json"), texts),
            resume.resume_key(tiny_model_dir, quantize.QuantizeConfig(scheme="fp8").model_dump(mode="json"), other_data, texts),
            resume.resume_key(tiny_model_dir, quantize.QuantizeConfig(scheme="fp8").model_dump(mode="json"), CALIBRATION.model_dump(mode="json"), texts[1:])}
    assert len(keys) == 4


SAME_KEY_WRITER = """
import sys
from llmpress.components.data import DataSpec, load_texts
from llmpress.components.stages import quantize
calibration = DataSpec(source="builtin:pydoc-train", num_samples=8, seq_len=64)
quantize.run(sys.argv[1], sys.argv[2], quantize.QuantizeConfig(scheme="fp8", device="cpu"), calibration, load_texts(calibration),
             resume_key="shared")
"""


def test_two_stages_with_one_key_at_once_both_write_the_same_complete_output(tiny_model_dir, tmp_path, resume_root):
    import os

    import torch

    # a killed writer's half-written folder is there already: the lock says nobody owns it
    stale = resume_root / "quantize-shared.partial"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    writers = [subprocess.Popen([sys.executable, "-c", SAME_KEY_WRITER, str(tiny_model_dir), str(tmp_path / name)], env=os.environ,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for writer in writers:
        _, err = writer.communicate(timeout=600)
        assert writer.returncode == 0, err[-2000:]
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(resume_root.iterdir())  # the calibrated model, its lock and the stale half are gone


def test_calibrated_model_is_freed_before_the_self_check_reloads(tiny_model_dir, tmp_path, monkeypatch):
    # gptq traces the model (fp8 does not): the trace's registrations in torch.fx kept it alive
    import gc
    import weakref

    calibrated, alive_at_check = [], []
    real_oneshot, real_check = quantize.oneshot_quantize, quantize.self_check

    def recording_oneshot(model, *args):
        # every module, not only the top one: the trace's namespace held the inner model alone
        calibrated.extend(weakref.ref(module) for module in model.modules())
        return real_oneshot(model, *args)

    def checking_self_check(out_dir, device):
        gc.collect()
        alive_at_check.append(sorted({type(ref()).__name__ for ref in calibrated if ref() is not None}))
        return real_check(out_dir, device)

    monkeypatch.setattr(quantize, "oneshot_quantize", recording_oneshot)
    monkeypatch.setattr(quantize, "self_check", checking_self_check)
    calibration = DataSpec(source="builtin:pydoc-train", num_samples=2, seq_len=32)
    quantize.run(tiny_model_dir, tmp_path / "out", quantize.QuantizeConfig(scheme="gptq-w4a16"), calibration, load_texts(calibration))
    assert alive_at_check == [[]]
