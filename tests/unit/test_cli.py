"""The `megatron-gppo` entry point as a user runs it: exit codes and one-line errors."""

import subprocess
import sys

import pytest
import yaml


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "megatron_gppo.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=120,
    )


def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("train", "serve", "config"):
        assert name in result.stdout


@pytest.mark.parametrize(
    "content, overrides, expected",
    [
        ({"algorithm": {"betaa1": 0.5}}, [], "unknown key; did you mean 'algorithm.beta1'?"),
        ({"train": {"max_steps": "many"}}, [], "'train.max_steps': got 'many', expected an integer"),
        ({}, ["algorithm.eps_high=2"], "'algorithm.eps_high': got 2.0, expected null or a number in [0, 1)"),
        (None, [], "config file not found"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, content, overrides, expected):
    path = tmp_path / "run.yaml"
    if content is not None:
        path.write_text(yaml.safe_dump(content))
    result = run_cli("config", path, *overrides)
    assert result.returncode == 2
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_train_writes_the_resolved_config(tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 3}}))
    result = run_cli("train", path, f"train.output_dir={out}", "algorithm.beta1=0.25")
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["algorithm"]["beta1"] == 0.25
    assert written["train"]["output_dir"] == str(out)
    assert written["train"]["max_steps"] == 3
    assert result.returncode in (0, 1)


def test_config_reference_is_a_markdown_table():
    result = run_cli("config", "--reference")
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| key |")
    assert any(line.startswith("| `algorithm.beta1` |") for line in lines)


def test_usage_error_exits_2():
    result = run_cli("train")
    assert result.returncode == 2
    assert "required" in result.stderr
