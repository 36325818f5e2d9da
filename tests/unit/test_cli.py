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
    for name in ("train", "sft", "serve", "config"):
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


def test_train_checks_inputs_before_starting_anything(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 3, "output_dir": str(tmp_path / "run")}}))
    result = run_cli("train", path)
    assert result.returncode == 2
    assert result.stderr.strip() == "megatron-gppo train: error: config key 'model.hf_path' is empty"
    result = run_cli("sft", path, f"model.hf_path={tmp_path / 'missing'}", f"data.train_path={path}")
    assert result.returncode == 2
    assert f"config key 'model.hf_path': {tmp_path / 'missing'} does not exist" in result.stderr
    assert not (tmp_path / "run").exists()


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


@pytest.mark.parametrize("override, expected", [
    ("algorithm.loss=ce-gppo", "config key 'algorithm.loss': got 'ce-gppo', expected one of 'ce_gppo', 'ppo', "
                               "'grpo', 'dapo', 'cispo', 'gspo' (did you mean 'ce_gppo'?)"),
    ("rollout=3", "config key 'rollout': got 3, expected a mapping"),
    ("rollout.top_k=0", "config key 'rollout.top_k': got 0, expected -1 (disable) or at least 1"),
    ("algorithm.tis_cap=0.5", "config key 'algorithm.tis_cap': got 0.5, expected null (off) or a number >= 1"),
    ("train.min_lr=1", "config key 'train.min_lr': got 1.0, expected a number in [0, lr=1e-06]"),
    ("rollout.server_urls=ftp://a", "config key 'rollout.server_urls': got 'ftp://a', expected URLs starting with "
                                    "http:// or https://"),
])
def test_validation_errors_reach_the_user_as_one_line_with_exit_code_2(tmp_path, override, expected):
    path = tmp_path / "run.yaml"
    path.write_text("{}\n")
    result = run_cli("config", path, override)
    assert result.returncode == 2
    assert result.stderr == f"megatron-gppo config: error: {expected}\n"


@pytest.mark.parametrize("args", [["config", "--reference"], ["config"], ["--help"], ["serve", "--help"],
                                  ["train", "--help"]])
def test_output_survives_a_closed_pipe(args):
    process = subprocess.Popen([sys.executable, "-m", "megatron_gppo.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader is gone before the first line, as after `| head -0`
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert process.returncode in (0, 141), stderr
