"""tools/convert_*.py and verify_conversion.py: --help, and bad input -> one `error:` line, exit code 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gppo.checkpoint.convert import convert_hf_to_megatron
from tests._checkpoint_models import save_family_model

TOOLS = Path(__file__).resolve().parents[2] / "tools"
NAMES = ("convert_hf_to_megatron", "convert_megatron_to_hf", "verify_conversion")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    hf = save_family_model("qwen2_tied", root / "hf")
    convert_hf_to_megatron(hf, root / "meg", progress=False)
    return root, hf, root / "meg"


def _run(name: str, argv: list[str], capsys) -> tuple[int, str]:
    code = _tool(name).main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("name", NAMES)
def test_help(name):
    result = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage:" in result.stdout and "--output-dir" in result.stdout or "--atol" in result.stdout


def test_missing_directory_is_exit_2_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, str(TOOLS / "convert_hf_to_megatron.py"), "--hf-dir",
                             str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'} is not a directory"]


def _assert_one_error_line(code: int, err: str, pattern: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0], lines[0]


def test_bad_inputs(models, tmp_path, capsys):
    root, hf, meg = models
    out = str(tmp_path / "out")

    code, err = _run("convert_megatron_to_hf", ["--megatron-dir", str(tmp_path / "nope"), "--output-dir", out], capsys)
    _assert_one_error_line(code, err, "is not a directory")

    # Unsupported architecture.
    other = tmp_path / "mistral"
    other.mkdir()
    config = json.loads((hf / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    code, err = _run("convert_hf_to_megatron", ["--hf-dir", str(other), "--output-dir", out], capsys)
    _assert_one_error_line(code, err, "unsupported architecture MistralForCausalLM; supported: Qwen2ForCausalLM")

    # Truncated and corrupted safetensors.
    data = (hf / "model.safetensors").read_bytes()
    for label, payload in (("truncated", data[: len(data) // 2]), ("corrupted", b"\xff" * 64 + data[64:])):
        broken = tmp_path / label
        broken.mkdir()
        (broken / "config.json").write_text((hf / "config.json").read_text())
        (broken / "model.safetensors").write_bytes(payload)
        code, err = _run("convert_hf_to_megatron", ["--hf-dir", str(broken), "--output-dir", out], capsys)
        _assert_one_error_line(code, err, "is not a valid safetensors file")
    assert not Path(out).exists()

    # Weights that do not match config.json.
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    (mismatch / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    (mismatch / "model.safetensors").write_bytes(data)
    code, err = _run("convert_hf_to_megatron", ["--hf-dir", str(mismatch), "--output-dir", out], capsys)
    _assert_one_error_line(code, err, "does not match config.json")

    # A layout that does not divide the model (4 heads, 2 KV heads, 4 layers).
    for flags, pattern in ((["--tp", "3"], "tensor_parallel=3 does not divide num_attention_heads=4"),
                           (["--pp", "3"], "pipeline_parallel=3 does not divide num_hidden_layers=4")):
        code, err = _run("verify_conversion", ["--hf-dir", str(hf), "--megatron-dir", str(meg), *flags], capsys)
        _assert_one_error_line(code, err, pattern)

    # A megatron checkpoint without the HF config beside it.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metadata.json").write_text("{}")
    code, err = _run("convert_megatron_to_hf", ["--megatron-dir", str(bare), "--output-dir", out], capsys)
    _assert_one_error_line(code, err, "no HF config.json")

    code, err = _run("convert_megatron_to_hf", ["--megatron-dir", str(meg), "--output-dir", out,
                                                "--max-shard-size", "lots"], capsys)
    _assert_one_error_line(code, err, "cannot parse size 'lots'")
