"""Bad input to every subcommand and tool: exit code 2 and one line on stderr, never a traceback.

Over 200 command lines are generated from the config schema and a seed:
each config key given a value of the wrong type or out of its range (to
`config`, `train` and `sft`), unknown keys, YAML that is not a mapping or not
UTF-8, undecodable override bytes, missing files, impossible parallel
layouts, and bad arguments to `serve` and to each script in tools/. They run
in this process (each command's `main`), so a traceback cannot hide in a
child's output.
"""

from __future__ import annotations

import importlib.util
import io
import os
import random
import sys
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, SecretStr

from megatron_gppo.cli import main as cli_main
from megatron_gppo.config import RunConfig
from tests._tiny_models import save_test_model

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "configs" / "demo_cpu.yaml"
TOOLS = ("convert_hf_to_megatron", "convert_megatron_to_hf", "verify_conversion", "estimate_memory", "bench_serve",
         "bench_train_step", "bench_logprobs", "bench_weight_sync")


def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaves(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _bad_values(field, rng: random.Random) -> list[str]:
    """YAML override values that `field` must refuse: the wrong type, or outside its range."""
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType) else annotation
    if typing.get_origin(base) is typing.Literal:
        return ["no-such-choice", "[1, 2]"]
    if base is bool:
        return ["maybe", "{a: 1}"]
    if base in (int, float):
        values = ["lots", "[1, 2]", "{a: 1}"] + (["1.5"] if base is int else [])
        for bound in field.metadata:
            if isinstance(bound, (Ge, Gt)):
                low = bound.ge if isinstance(bound, Ge) else bound.gt
                values.append(str(low - 1 if isinstance(bound, Ge) else low))
            if isinstance(bound, (Le, Lt)):
                high = bound.le if isinstance(bound, Le) else bound.lt
                values.append(str(high + 1 if isinstance(bound, Le) else high))
        return rng.sample(values, k=min(3, len(values)))
    if base in (str, SecretStr):
        return ["[1, 2]", "{a: 1}"]
    if typing.get_origin(base) is list:
        return ["{a: 1}", "[[1], {b: 2}]"]
    if typing.get_origin(base) is dict:
        return ["[1, 2]", "7"]
    return ["{a: [1, {b: 2}]}"]


def _config_cases() -> list[tuple[str, list[str], str]]:
    """(id, argv, text the error must contain)."""
    rng = random.Random(0)
    cases = []
    for key, field in _leaves(RunConfig):
        for value in _bad_values(field, rng):
            for command in ("config", rng.choice(["train", "sft"])):
                cases.append((f"{command}-{key}={value}", [command, str(DEMO), f"{key}={value}"], f"'{key}'"))
    for key in ("train.max_stepz", "algorithm.beta3", "rollout.nonsense", "nosection.key", "model"):
        cases.append((f"unknown-{key}", ["config", str(DEMO), f"{key}=1"], "config key"))
    return cases


def _file_cases(tmp: Path, model_dir: Path) -> list[tuple[str, list[str], str]]:
    not_utf8 = tmp / "not_utf8.yaml"
    not_utf8.write_bytes(b"train:\n  max_steps: \xff\xfe\n")
    a_list = tmp / "list.yaml"
    a_list.write_text("- train\n- model\n")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("train: [1, 2\n")
    missing = tmp / "missing"
    run = ["train", str(DEMO), f"model.hf_path={model_dir}", f"data.train_path={DEMO}", "data.eval_path=",
           f"train.output_dir={tmp / 'never'}"]
    return [
        ("not-utf8-yaml", ["config", str(not_utf8)], "UTF-8"),
        ("yaml-list", ["config", str(a_list)], "mapping"),
        ("bad-yaml", ["train", str(bad_yaml)], "not valid YAML"),
        ("no-such-config", ["sft", str(missing / "c.yaml")], "not found"),
        ("undecodable-override", ["config", str(DEMO), os.fsdecode(b"train.lr=\xff")], "train.lr"),
        ("undecodable-key", ["config", str(DEMO), os.fsdecode(b"tr\xffain.lr=1")], "config key"),
        ("override-without-equals", ["config", str(DEMO), "train.lr"], "train.lr"),
        ("missing-hf-path", ["train", str(DEMO), f"model.hf_path={missing}"], "does not exist"),
        ("missing-data", [*run, f"data.train_path={missing}.jsonl"], "does not exist"),
        ("missing-megatron-ckpt", [*run, f"model.megatron_checkpoint={missing}"], "does not exist"),
        ("tp-not-dividing-heads", [*run, "parallel.tensor_parallel=3"], "tensor_parallel"),
        ("pp-more-than-layers", [*run, "parallel.pipeline_parallel=8"], "pipeline_parallel"),
        ("huge-tp", [*run, f"parallel.tensor_parallel={2**40}"], "tensor_parallel"),
        ("serve-missing-model", ["serve", "--model-path", str(missing), "--port", "0"], "not found"),
        ("serve-bad-port", ["serve", "--model-path", str(model_dir), "--port", "70000"], "--port"),
        ("serve-bad-running", ["serve", "--model-path", str(model_dir), "--max-running-requests", "0"], "must be"),
        ("serve-bad-dtype", ["serve", "--model-path", str(model_dir), "--dtype", "int3"], "--dtype"),
        ("serve-not-a-number", ["serve", "--model-path", str(model_dir), "--port", "eighty"], "--port"),
        ("no-such-subcommand", ["fly"], "invalid choice"),
        ("unknown-flag", ["config", "--frobnicate"], "unrecognized"),
    ]


def _tool_cases(tmp: Path, model_dir: Path) -> list[tuple[str, str, list[str], str]]:
    """(id, tool, argv, text) for the scripts in tools/."""
    missing = str(tmp / "missing")
    return [
        ("to-megatron-missing", "convert_hf_to_megatron", ["--hf-dir", missing, "--output-dir", str(tmp / "o1")],
         "missing"),
        ("to-megatron-exists", "convert_hf_to_megatron", ["--hf-dir", str(model_dir), "--output-dir", str(tmp)],
         "exists"),
        ("to-megatron-no-args", "convert_hf_to_megatron", [], "required"),
        ("to-hf-missing", "convert_megatron_to_hf", ["--megatron-dir", missing, "--output-dir", str(tmp / "o2")],
         "missing"),
        ("to-hf-not-a-checkpoint", "convert_megatron_to_hf", ["--megatron-dir", str(model_dir), "--output-dir",
                                                               str(tmp / "o3")], str(model_dir)),
        ("verify-missing", "verify_conversion", ["--hf-dir", missing, "--megatron-dir", missing], "missing"),
        ("verify-bad-tp", "verify_conversion", ["--hf-dir", str(model_dir), "--megatron-dir", missing, "--tp", "x"],
         "--tp"),
        ("memory-missing", "estimate_memory", ["--hf-config", missing], "missing"),
        ("memory-bad-tp", "estimate_memory", ["--hf-config", str(model_dir), "--seq-length", "64", "--tp", "3"],
         "tensor_parallel"),
        ("memory-negative", "estimate_memory", ["--hf-config", str(model_dir), "--seq-length", "64", "--micro-batch-size",
                                              "-4"], "micro"),
        ("bench-serve-clients", "bench_serve", ["--clients", "0"], "--clients"),
        ("bench-serve-duration", "bench_serve", ["--duration-s", "nan-ish"], "--duration-s"),
        ("bench-train-threads", "bench_train_step", ["--tp", "many"], "--tp"),
        ("bench-train-dtype", "bench_train_step", ["--dtype", "fp3"], "--dtype"),
        ("bench-logprobs-device", "bench_logprobs", ["--device", "tpu"], "--device"),
        ("bench-logprobs-tokens", "bench_logprobs", ["--tokens", "x"], "--tokens"),
        ("bench-sync-repeats", "bench_weight_sync", ["--repeats", "x"], "--repeats"),
        ("bench-sync-bucket", "bench_weight_sync", ["--bucket-mb", "big"], "--bucket-mb"),
    ]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    return tmp, save_test_model(tmp / "model")


def _run(main, argv) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _assert_one_line_error(code, stderr: str, expected: str, where: str) -> None:
    assert code == 2, f"{where}: exit code {code}, stderr:\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, f"{where}:\n{stderr[-2000:]}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"{where}: {len(lines)} lines:\n{stderr[-2000:]}"
    assert expected in lines[0], f"{where}: {lines[0]!r} does not mention {expected!r}"


def test_over_200_bad_command_lines_exit_2_with_one_line(scratch, monkeypatch):
    tmp, model_dir = scratch
    monkeypatch.chdir(tmp)  # relative paths in the demo config point nowhere from here
    cases = [(name, cli_main, argv, text) for name, argv, text in [*_config_cases(), *_file_cases(tmp, model_dir)]]
    cases += [(name, _load_tool(tool).main, argv, text) for name, tool, argv, text in _tool_cases(tmp, model_dir)]
    assert len(cases) >= 200
    failures = []
    for name, main, argv, text in cases:
        try:
            _assert_one_line_error(*_run(main, argv), text, f"{name}: {argv}")
        except AssertionError as err:
            failures.append(str(err))
    print(f"\n{len(cases)} bad command lines, {len(failures)} not answered with code 2 and one line")
    assert not failures, "\n\n".join(failures[:15])
