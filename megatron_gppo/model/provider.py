"""Build the megatron-core GPTModel chunks of this rank from a Hugging Face architecture.

Qwen2 / Qwen2.5 (qkv bias), Llama 3 (GQA, llama3 rope scaling) and Qwen3
(qk RMSNorm, head_dim independent of hidden/heads), tied or untied
embeddings, fp32 or bf16, activation recompute, and pipeline stages with
virtual stages (one model chunk per virtual stage).

Layer specs: Transformer Engine on CUDA when TE is importable, otherwise
megatron's local (pure torch) modules, with an RMSNorm of ours that also works
under sequence parallelism (megatron's `WrappedTorchNorm` refuses it).

The vocabulary is padded to a multiple of TP (megatron splits the output
layer by rows); `PolicyGPTModel.vocab_size_unpadded` remembers the true size so
log-probs never see the padded rows.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_gppo.config import ModelConfig
from megatron_gppo.model.arch import ModelArch
from megatron_gppo.model.parallel import ParallelDims

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def padded_vocab_size(vocab_size: int, *, tp: int) -> int:
    """Smallest multiple of `tp` that is >= vocab_size (megatron splits the vocab evenly over TP)."""
    return -(-vocab_size // tp) * tp


def has_transformer_engine() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's constructor; tags its weight for sequence parallel.

    Under sequence parallelism each TP rank normalises a different slice of the
    sequence, so megatron all-reduces the grads of parameters tagged
    `sequence_parallel` across TP (finalize_model_grads).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


class LocalQKRMSNorm(torch.nn.RMSNorm):
    """RMSNorm over one head's channels (Qwen3 q/k norm).

    It sits inside the TP region (heads are split, not the sequence), so it is
    not tagged for sequence parallel; megatron sums its grads across TP by name.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)


def transformer_config(arch: ModelArch, dims: ParallelDims, *, model: ModelConfig) -> TransformerConfig:
    """megatron TransformerConfig for `arch` under layout `dims`."""
    if arch.family == "llama" and (arch.mlp_bias or (arch.qkv_bias)):
        # megatron's add_bias_linear puts biases on every linear (qkv, proj, fc1, fc2) at once.
        raise ValueError("Llama with attention_bias or mlp_bias is not supported; only bias-free Llama")
    dtype = _DTYPES[model.dtype]
    recompute = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }[model.recompute]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp if dims.vpp > 1 else None,
        sequence_parallel=dims.sequence_parallel,
        num_layers_in_first_pipeline_stage=dims.num_layers_in_first_stage or None,
        num_layers_in_last_pipeline_stage=dims.num_layers_in_last_stage or None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # With PP=2 the previous and next stage are the same rank, and the interleaved
        # schedule's batched send/recv pairs a forward activation with a backward grad
        # (NVIDIA/Megatron-LM#750, #1450). Overlapped p2p sends each direction on its own.
        overlap_p2p_comm=dims.vpp > 1,
        batch_p2p_comm=dims.vpp == 1,
        **recompute,
    )


def _local_layer_spec(config: TransformerConfig) -> ModuleSpec:
    spec = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm"))
    spec.submodules.input_layernorm = LocalRMSNorm
    spec.submodules.pre_mlp_layernorm = LocalRMSNorm
    attention = spec.submodules.self_attention.submodules
    attention.q_layernorm = LocalQKRMSNorm if config.qk_layernorm else IdentityOp
    attention.k_layernorm = LocalQKRMSNorm if config.qk_layernorm else IdentityOp
    return spec


def decoder_spec(config: TransformerConfig, *, vp_stage: int | None, use_te: bool):
    """The layer spec (TE) or this stage's block spec (local modules, our final norm)."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[_local_layer_spec(config)] * num_layers, layer_norm=LocalRMSNorm)


class PolicyGPTModel(GPTModel):
    """GPTModel whose last stage returns the final (normed) hidden states instead of logits.

    In megatron-core 0.16.1 `GPTModel.forward` runs embedding -> decoder (whose
    last stage applies the final norm) -> `_postprocess`, and `_postprocess` is
    the only place that applies the output layer (plus MTP, which we do not
    use). Overriding `_postprocess` to return its input is the smallest cut
    that hands us `[s, b, h]` hidden states: the fused vocab-parallel log-prob
    then multiplies them with `output_weight()` itself without ever
    materialising `[s, b, vocab/TP]` logits. The output layer's parameters stay
    in the module, so DDP, the optimizer, the tied-embedding grad all-reduce
    and checkpoints see them as usual. Under sequence parallelism the returned
    hidden states are sharded along the sequence (`[s/TP, b, h]`).
    """

    def __init__(self, *args, vocab_size_unpadded: int, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.config.mtp_num_layers is None, "multi-token prediction is not supported"
        self.vocab_size_unpadded = vocab_size_unpadded

    def _postprocess(self, hidden_states, **unused):
        return hidden_states

    def output_weight(self) -> torch.Tensor:
        """This rank's `[padded_vocab/TP, hidden]` rows of the output layer (last stage only)."""
        assert self.post_process, "output_weight() exists only on the last pipeline stage"
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def build_model_chunks(arch: ModelArch, dims: ParallelDims, *, model: ModelConfig) -> list[PolicyGPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), on CPU or the current GPU.

    Requires `init_distributed` (megatron's parallel state) to have run.
    """
    config = transformer_config(arch, dims, model=model)
    use_te = has_transformer_engine()
    chunks = []
    for vp_stage in range(dims.vpp):
        stage = vp_stage if dims.vpp > 1 else None
        chunk = PolicyGPTModel(
            config=config,
            transformer_layer_spec=decoder_spec(config, vp_stage=stage, use_te=use_te),
            vocab_size=padded_vocab_size(arch.vocab_size, tp=dims.tp),
            vocab_size_unpadded=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            seq_len_interpolation_factor=arch.rope_scaling_factor if arch.rope_scaling_type == "linear" else None,
            vp_stage=stage,
        )
        if arch.rope_scaling_type == "llama3":
            # megatron's rope_scaling=True hard-codes low/high freq factors 1/4 and an
            # 8192 original context; apply the config's own values to the same formula.
            rope = chunk.rotary_pos_emb
            rope.inv_freq = rope._apply_scaling(
                rope.inv_freq,
                factor=arch.rope_scaling_factor,
                low_freq_factor=arch.rope_low_freq_factor,
                high_freq_factor=arch.rope_high_freq_factor,
                original_max_position_embeddings=arch.rope_original_max_position_embeddings,
            )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


__all__ = [
    "LocalQKRMSNorm", "LocalRMSNorm", "PolicyGPTModel", "build_model_chunks", "decoder_spec",
    "has_transformer_engine", "padded_vocab_size", "transformer_config",
]
