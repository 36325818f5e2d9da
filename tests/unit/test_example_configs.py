"""examples/configs: every file loads; the scaling configs keep the paper's settings and fit their models.

The architectures are the published config.json numbers of the models the
configs are for (DeepSeek-R1-Distill-Qwen-1.5B / -7B, Qwen2.5-32B, Qwen2.5-72B),
written out here so no download is needed. Each layout is validated the way
the trainer validates it (`build_parallel_dims`) at the world size its header
states.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from megatron_gppo.config import ConfigError, load_config, to_dict
from megatron_gppo.model.arch import ModelArch
from megatron_gppo.model.parallel import build_parallel_dims

CONFIG_DIR = Path(__file__).resolve().parents[2] / "examples" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
# What slurm/disaggregated.sbatch adds for rollout.backend=sglang.
LAUNCHER_OVERRIDES = ["rollout.server_urls=[http://node0:30000,http://node0:30001]",
                      "rollout.router_url=http://node0:30080"]


def _qwen2(*, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, max_positions: int,
           rope_theta: float, tied: bool) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": ffn, "vocab_size": vocab,
        "max_position_embeddings": max_positions, "rope_theta": rope_theta, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied, "use_sliding_window": False, "torch_dtype": "bfloat16",
    }


# name -> (HF config, published parameter count in billions)
MODELS = {
    "DeepSeek-R1-Distill-Qwen-1.5B": (_qwen2(hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960, vocab=151936,
                                             max_positions=131072, rope_theta=10000.0, tied=False), 1.78),
    "DeepSeek-R1-Distill-Qwen-7B": (_qwen2(hidden=3584, layers=28, heads=28, kv_heads=4, ffn=18944, vocab=152064,
                                           max_positions=131072, rope_theta=10000.0, tied=False), 7.62),
    "Qwen2.5-32B": (_qwen2(hidden=5120, layers=64, heads=40, kv_heads=8, ffn=27648, vocab=152064,
                           max_positions=32768, rope_theta=1000000.0, tied=False), 32.76),
    "Qwen2.5-72B": (_qwen2(hidden=8192, layers=80, heads=64, kv_heads=8, ffn=29568, vocab=152064,
                           max_positions=32768, rope_theta=1000000.0, tied=False), 72.71),
}

# config file -> (model, trainer world size: GPUs of the trainer nodes)
SCALING = {
    "r1_distill_qwen_1p5b.yaml": ("DeepSeek-R1-Distill-Qwen-1.5B", 8),
    "r1_distill_qwen_7b.yaml": ("DeepSeek-R1-Distill-Qwen-7B", 16),
    "qwen2p5_32b_layout.yaml": ("Qwen2.5-32B", 32),
    "qwen2p5_72b_layout.yaml": ("Qwen2.5-72B", 64),
}

# CE-GPPO paper, §5.2: the betas of the reported runs.
PAPER_BETAS = {"r1_distill_qwen_1p5b.yaml": (0.5, 1.0), "r1_distill_qwen_7b.yaml": (0.75, 1.0)}


def _uses_sglang(path: Path) -> bool:
    return (yaml.safe_load(path.read_text()).get("rollout") or {}).get("backend") == "sglang"


def _load(path: Path):
    return load_config(path, LAUNCHER_OVERRIDES if _uses_sglang(path) else [])


def _header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])


def test_the_scaling_configs_exist():
    assert set(SCALING) <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_loads(path):
    _load(path)


@pytest.mark.parametrize("name", sorted(SCALING))
def test_sglang_configs_miss_only_what_the_launcher_adds(name):
    with pytest.raises(ConfigError, match="backend 'sglang' needs server_urls or router_url"):
        load_config(CONFIG_DIR / name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_architectures_match_the_published_sizes(name):
    config, billions = MODELS[name]
    assert ModelArch.from_hf_config(config).num_params / 1e9 == pytest.approx(billions, rel=0.005)


@pytest.mark.parametrize("name", sorted(SCALING))
def test_layout_fits_the_model_at_the_stated_world_size(name):
    path = CONFIG_DIR / name
    model, world_size = SCALING[name]
    config = _load(path)
    arch = ModelArch.from_hf_config(MODELS[model][0])
    dims = build_parallel_dims(config.parallel, world_size=world_size, arch=arch)

    # The header's "N ranks: TPa x PPb [x VPPc] x DPd" line says the same as the file and the table above.
    match = re.search(r"= (\d+) ranks: TP(\d+) x PP(\d+)(?: x VPP(\d+))? x DP(\d+)", _header(path))
    assert match, f"{name}: no 'trainer: ... = N ranks: TPa x PPb x DPd' line in the header"
    stated = tuple(int(g) if g else 1 for g in match.groups())
    assert stated == (world_size, dims.tp, dims.pp, dims.vpp, dims.dp)
    assert f"{world_size // 8} node" in _header(path).split("trainer:")[1].splitlines()[0]

    assert config.data.max_prompt_tokens + config.rollout.max_new_tokens <= arch.max_position_embeddings
    assert config.model.dtype == "bfloat16"
    if dims.tp > 1:
        assert config.parallel.sequence_parallel
    if world_size > 8:
        assert config.train.distributed_optimizer


def test_layout_check_uses_the_architecture():
    config = load_config(CONFIG_DIR / "r1_distill_qwen_7b.yaml", [*LAUNCHER_OVERRIDES, "parallel.tensor_parallel=8"])
    arch = ModelArch.from_hf_config(MODELS["DeepSeek-R1-Distill-Qwen-7B"][0])
    with pytest.raises(ValueError, match="tensor_parallel=8 does not divide num_attention_heads=28"):
        build_parallel_dims(config.parallel, world_size=16, arch=arch)


@pytest.mark.parametrize("name", sorted(PAPER_BETAS))
def test_paper_hyper_parameters(name):
    config = _load(CONFIG_DIR / name)
    alg, train, rollout = config.algorithm, config.train, config.rollout
    # §4.1 Training.
    assert train.lr == 1e-6 and train.lr_schedule == "constant"
    assert rollout.num_samples_per_prompt == 8
    assert alg.loss == "ce_gppo" and (alg.eps_low, alg.eps_high) == (0.2, 0.2)
    assert rollout.max_new_tokens == 16 * 1024
    assert alg.aggregation == "token_mean"
    assert alg.entropy_coef == 0.0 and alg.nll_coef == 0.0
    assert train.max_steps == 1000 and train.eval_samples_per_prompt == 32
    # §5.2: the betas of the reported run, kept for the whole run.
    assert (alg.beta1, alg.beta2) == PAPER_BETAS[name] and alg.beta_schedule.kind == "constant"
    # The authors' recipe: 128 prompts a step in mini-batches of 16 prompts, 4k prompts, filtered groups.
    assert (train.prompts_per_step, train.num_minibatches, train.num_epochs) == (128, 8, 1)
    assert config.data.max_prompt_tokens == 4096 and alg.dynamic_sampling
    assert (rollout.temperature, rollout.top_p, rollout.top_k) == (1.0, 1.0, -1)
    assert rollout.backend == "sglang" and config.model.dtype == "bfloat16"


@pytest.mark.parametrize("name", ["qwen2p5_32b_layout.yaml", "qwen2p5_72b_layout.yaml"])
def test_large_layouts_keep_the_7b_algorithm(name):
    config, reference = _load(CONFIG_DIR / name), _load(CONFIG_DIR / "r1_distill_qwen_7b.yaml")
    assert to_dict(config.algorithm) == to_dict(reference.algorithm)
    assert to_dict(config.rollout) == to_dict(reference.rollout)
    assert to_dict(config.data) == to_dict(reference.data)
    same = ("max_steps", "prompts_per_step", "num_minibatches", "num_epochs", "lr", "lr_schedule", "warmup_steps",
            "weight_decay", "grad_clip", "eval_samples_per_prompt", "eval_temperature")
    assert {k: getattr(config.train, k) for k in same} == {k: getattr(reference.train, k) for k in same}
