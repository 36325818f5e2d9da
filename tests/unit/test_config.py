"""Config loading, dotted overrides, coercion and one-line validation errors."""

import pytest
import yaml

from megatron_gppo.config import (
    ConfigError,
    RunConfig,
    describe_fields,
    load_config,
    save_config,
    to_dict,
)


def write_yaml(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_a_file():
    config = load_config()
    assert config == RunConfig()
    assert config.algorithm.loss == "ce_gppo"


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = write_yaml(tmp_path, {"algorithm": {"beta1": 0.25, "eps_high": 0.28}, "train": {"max_steps": 7}})
    config = load_config(path, ["algorithm.beta1=0.75", "algorithm.beta_schedule.kind=step"])
    assert config.algorithm.beta1 == 0.75  # override beats the file
    assert config.algorithm.eps_high == 0.28  # file beats the default
    assert config.train.max_steps == 7
    assert config.algorithm.beta_schedule.kind == "step"


@pytest.mark.parametrize(
    "override, attribute, expected",
    [
        ("train.max_steps=12", ("train", "max_steps"), 12),
        ("train.lr=3e-5", ("train", "lr"), 3e-5),
        ("train.lr=1", ("train", "lr"), 1.0),
        ("checkpoint.resume=false", ("checkpoint", "resume"), False),
        ("checkpoint.resume=yes", ("checkpoint", "resume"), True),
        ("rollout.server_urls=http://a:1,http://b:2", ("rollout", "server_urls"), ["http://a:1", "http://b:2"]),
        ("rollout.server_urls=[http://a:1]", ("rollout", "server_urls"), ["http://a:1"]),
        ("model.hf_path=123", ("model", "hf_path"), "123"),
        ("algorithm.eps_high=0.28", ("algorithm", "eps_high"), 0.28),
        ("algorithm.dual_clip_c=3", ("algorithm", "dual_clip_c"), 3.0),
    ],
)
def test_override_values_are_coerced_to_the_field_type(override, attribute, expected):
    config = load_config(None, [override, "rollout.backend=sglang"] if "server_urls" in override else [override])
    section, name = attribute
    value = getattr(getattr(config, section), name)
    assert value == expected and type(value) is type(expected)


def test_optional_values_accept_null():
    config = load_config(None, ["algorithm.eps_high=0.3", "algorithm.tis_cap=2"])
    assert config.algorithm.eps_high == 0.3 and config.algorithm.tis_cap == 2.0
    config = load_config(None, ["algorithm.eps_high=null", "algorithm.tis_cap=None"])
    assert config.algorithm.eps_high is None and config.algorithm.tis_cap is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.bta1=1", "config key 'algorithm.bta1': unknown key; did you mean 'algorithm.beta1'?"),
        ("algoritm.beta1=1", "config key 'algoritm': unknown key; did you mean 'algorithm'?"),
        ("train.max_steps=ten", "config key 'train.max_steps': got 'ten', expected an integer"),
        ("train.max_steps=1.5", "config key 'train.max_steps': got 1.5, expected an integer"),
        ("algorithm.eps_low=1.5", "config key 'algorithm.eps_low': got 1.5, expected null or a number in [0, 1)"),
        ("algorithm.beta2=-1", "config key 'algorithm.beta2': got -1.0, expected a number >= 0"),
        ("checkpoint.resume=maybe", "config key 'checkpoint.resume': got 'maybe', expected true or false"),
        ("algorithm.dual_clip_c=0.5", "config key 'algorithm.dual_clip_c': got 0.5, expected null (off) or a number > 1"),
        ("algorithm.tis_cap=abc", "config key 'algorithm.tis_cap': got 'abc', expected null or a number"),
        ("parallel.tensor_parallel=0", "config key 'parallel.tensor_parallel': got 0, expected an integer >= 1"),
        ("algorithm.beta_schedule.kind=linear",
         "config key 'algorithm.beta_schedule.ramp_steps': got 0, expected an integer >= 1 for kind=linear"),
        ("algorithm", "config key 'algorithm': override must look like section.key=value"),
        ("train.max_tokens_per_micro_batch=2000",
         "config key 'train.max_tokens_per_micro_batch': got 2000, but a rollout can be 2048 tokens long "
         "(data.max_prompt_tokens + rollout.max_new_tokens); raise it to at least 2048"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_a_token_budget_needs_packing():
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch': is a packed micro-batch size, but "
                                          "pack_sequences is false"):
        load_config(None, ["train.pack_sequences=false", "train.max_tokens_per_micro_batch=4096"])
    assert load_config(None, ["train.max_tokens_per_micro_batch=4096"]).train.max_tokens_per_micro_batch == 4096


def test_literal_choices_suggest_the_closest(tmp_path):
    path = write_yaml(tmp_path, {"algorithm": {"loss": "ce-gppo"}})
    with pytest.raises(ConfigError, match=r"algorithm.loss': got 'ce-gppo', expected one of .*did you mean 'ce_gppo'"):
        load_config(path)


def test_unknown_key_in_yaml_is_reported_with_its_path(tmp_path):
    path = write_yaml(tmp_path, {"rollout": {"temprature": 0.7}})
    with pytest.raises(ConfigError, match=r"'rollout.temprature': unknown key; did you mean 'rollout.temperature'"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML at line"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(scalar)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["algorithm.beta1=0.125", "train.output_dir=somewhere"])
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_every_field_is_documented():
    rows = describe_fields()
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert not undocumented
    keys = [key for key, *_ in rows]
    assert "algorithm.beta_schedule.switch_step" in keys and "train.output_dir" in keys
    assert len(keys) == len(set(keys)) == len(_leaves(to_dict(RunConfig())))


def _leaves(tree, prefix=""):
    out = []
    for key, value in tree.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def test_realized_beta_sensitivity_needs_the_loss_with_betas():
    with pytest.raises(ConfigError, match="^config key 'logging.realized_sensitivity_beta_step': needs "
                                          "algorithm.loss=ce_gppo, the loss with betas \\(got ppo\\); set it to null$"):
        load_config(None, ["algorithm.loss=ppo", "logging.realized_sensitivity_beta_step=0.5"])
    with pytest.raises(ConfigError, match="got 0.0, expected null or a number > 0"):
        load_config(None, ["logging.realized_sensitivity_beta_step=0"])
    assert load_config(None, ["logging.realized_sensitivity_beta_step=0.5"]).logging.realized_sensitivity_beta_step == 0.5
