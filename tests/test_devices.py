"""Where models run and in which dtype: `device_and_dtype`, and the `--device` flag of every command
that loads a model (`iadgpt inspect`, `iadgpt chat`, `eval/reasoning.py`) reaching the model."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

from iadgpt import chat
from iadgpt.evaluation import inspect_cli
from iadgpt.inspection import Inspector
from iadgpt.model.checkpoint import DeviceError, device_and_dtype, load_model, load_processor, weights_dtype

REASONING_RECIPE = Path(__file__).resolve().parents[1] / "eval" / "reasoning.py"


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint saved in bf16, as Qwen2.5-VL is released: dtype "auto" would load it in bf16."""
    out = tmp_path_factory.mktemp("bf16") / "tiny_bf16"
    load_model(tiny_checkpoint, dtype=torch.bfloat16).save_pretrained(out, safe_serialization=True)
    load_processor(tiny_checkpoint).save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    return out


@pytest.fixture()
def loaded_inspectors(monkeypatch):
    """Every Inspector a command builds, as built (the real object, only recorded)."""
    built = []
    original = Inspector.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(Inspector, "__init__", record)
    return built


def assert_on_cpu_in_fp32(inspector: Inspector) -> None:
    model = inspector.model
    assert model.device == torch.device("cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


# --------------------------------------------------------------------------------------------------
# the rule


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("cuda", torch.bfloat16),
                                           ("cuda:3", torch.bfloat16), ("mps", torch.bfloat16)])
def test_weights_are_bf16_on_a_gpu_and_fp32_on_the_cpu(device, dtype):
    assert weights_dtype(torch.device(device)) == dtype


def test_the_default_device_is_the_gpu_when_there_is_one():
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert device_and_dtype() == (expected, weights_dtype(expected))
    assert device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("device, message", [
    ("gpu", "unknown device 'gpu': use one of cpu, cuda, cuda:N, mps"),
    ("cuda:x", "unknown device 'cuda:x'"),
    ("xpu", "device 'xpu' is not supported: use one of cpu, cuda, cuda:N, mps"),
    ("meta", "device 'meta' is not supported"),
])
def test_an_unknown_device_is_named(device, message):
    with pytest.raises(DeviceError, match=f"^{message}"):
        device_and_dtype(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_a_gpu_that_is_not_there_is_named():
    with pytest.raises(DeviceError, match=r"^device 'cuda': no CUDA GPU is visible on this machine \(use cpu\)"):
        device_and_dtype("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available")
def test_mps_where_it_is_not_available_is_named():
    with pytest.raises(DeviceError, match=r"^device 'mps': Apple's MPS backend is not available"):
        device_and_dtype("mps")


# --------------------------------------------------------------------------------------------------
# the Inspector


def test_inspector_loads_the_devices_dtype_not_the_checkpoints(bf16_checkpoint, random_image):
    default = Inspector.from_pretrained(bf16_checkpoint)
    if not torch.cuda.is_available():
        assert_on_cpu_in_fp32(default)
    # An explicit dtype wins over the rule; inputs follow the model (pixel values are cast by it).
    half = Inspector.from_pretrained(bf16_checkpoint, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    query, normals = random_image(56), [random_image(56), random_image(56)]
    [full_result] = Inspector.from_pretrained(bf16_checkpoint, device="cpu").inspect([query], [normals])
    [half_result] = half.inspect([query], [normals])
    assert half_result.score == pytest.approx(full_result.score, abs=0.05)
    assert half_result.anomaly_map.shape == full_result.anomaly_map.shape == (56, 56)


# --------------------------------------------------------------------------------------------------
# the commands


def test_inspect_device_reaches_the_model(bf16_checkpoint, random_image, tmp_path, loaded_inspectors):
    random_image(56).save(tmp_path / "normal.png")
    random_image(56).save(tmp_path / "query.png")
    args = inspect_cli.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(bf16_checkpoint), "--normals", str(tmp_path / "normal.png"), "--query",
         str(tmp_path / "query.png"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert args.device == "cpu"
    assert inspect_cli.run(args) == 0
    [inspector] = loaded_inspectors
    assert_on_cpu_in_fp32(inspector)
    assert (tmp_path / "out" / "scores.csv").read_text().count("\n") == 2


def test_inspect_refuses_an_unknown_device_before_loading(bf16_checkpoint, tmp_path, loaded_inspectors):
    args = inspect_cli.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(bf16_checkpoint), "--normals", str(tmp_path), "--query", str(tmp_path), "--out",
         str(tmp_path / "out"), "--device", "gpu"])
    with pytest.raises(SystemExit, match=r"^iadgpt inspect: --device: unknown device 'gpu': use one of cpu, cuda"):
        inspect_cli.run(args)
    assert not loaded_inspectors and not (tmp_path / "out").exists()


def test_chat_device_reaches_the_model(bf16_checkpoint, random_image, tmp_path, loaded_inspectors):
    random_image(56).save(tmp_path / "query.png")
    parser = chat.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(bf16_checkpoint), "--query", str(tmp_path / "query.png"),
                              "--device", "cpu"])
    assert chat.run(args, stdin=io.StringIO("/exit\n"), stdout=io.StringIO()) == 0
    [inspector] = loaded_inspectors
    assert_on_cpu_in_fp32(inspector)

    args.device = "cuda:banana"
    with pytest.raises(SystemExit, match=r"^iadgpt chat: --device: unknown device 'cuda:banana'"):
        chat.run(args, stdin=io.StringIO("/exit\n"), stdout=io.StringIO())
    assert len(loaded_inspectors) == 1


def load_reasoning_recipe():
    spec = importlib.util.spec_from_file_location("eval_reasoning_recipe_devices", REASONING_RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reasoning_device_reaches_the_model(bf16_checkpoint, tmp_path, loaded_inspectors, capsys):
    recipe = load_reasoning_recipe()
    common = ["--model", str(bf16_checkpoint), "--mmad", str(tmp_path / "mmad.json"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        recipe.parse_args([*common, "--device", "gpu"])
    assert exit_.value.code == 2
    assert "--device: unknown device 'gpu': use one of cpu, cuda, cuda:N, mps" in capsys.readouterr().err

    assert recipe.parse_args([*common, "--device", "cpu"]).device == torch.device("cpu")
    (tmp_path / "mmad.json").write_text("[]")  # bad input, read after the model is loaded
    with pytest.raises(SystemExit, match="bad input"):
        recipe.main([*common, "--device", "cpu"])
    [inspector] = loaded_inspectors
    assert_on_cpu_in_fp32(inspector)
