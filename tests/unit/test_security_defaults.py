"""Security defaults that hold by construction: loopback binding, no unpickling of outside data, no secrets saved."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from megatron_gppo.cli import build_parser
from megatron_gppo.config import load_config, save_config, to_dict
from megatron_gppo.rollout.server import ServerArgs

ROOT = Path(__file__).resolve().parents[2]
# The one place that unpickles: weight payloads, through an unpickler that admits torch's tensor classes only.
RESTRICTED_UNPICKLER = ROOT / "megatron_gppo" / "rollout" / "weight_loader.py"


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_nothing_loads_pickles_without_weights_only():
    offenders = []
    for path in sorted([*ROOT.glob("megatron_gppo/**/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("examples/*.py")]):
        for call, name in _calls(path):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if name == "torch.load" and not any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in call.keywords):
                offenders.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler") and path != RESTRICTED_UNPICKLER:
                offenders.append(f"{where}: {name}")
    assert not offenders, "\n".join(offenders)


def test_servers_bind_loopback_unless_told():
    args = build_parser().parse_args(["serve", "--model-path", "m"])
    assert args.host == "127.0.0.1" and ServerArgs(model_path="m").host == "127.0.0.1"


def test_the_api_key_is_never_written_with_the_config(tmp_path):
    config = load_config(ROOT / "examples" / "configs" / "demo_cpu.yaml", ["rollout.api_key=s3cret-key"])
    assert config.rollout.api_key.get_secret_value() == "s3cret-key"
    save_config(config, tmp_path / "config.yaml")
    assert "s3cret-key" not in (tmp_path / "config.yaml").read_text()
    assert "s3cret-key" not in repr(config) and "s3cret-key" not in str(to_dict(config))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["rollout"]["api_key"] == "**********"


def test_command_lines_are_logged_without_secrets():
    from megatron_gppo.config import redact_secrets

    argv = ["train", "c.yaml", "rollout.api_key=abc", "train.lr=1", "--api-key", "abc", "--api-key=abc"]
    assert redact_secrets(argv) == ["train", "c.yaml", "rollout.api_key=**********", "train.lr=1", "--api-key",
                                    "**********", "--api-key=**********"]
