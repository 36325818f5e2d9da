"""The CPU compatibility layer for megatron-core is scoped: torch and Hugging Face models are untouched.

A global torch patch was seen to corrupt HF models (rotary inv_freq after
from_pretrained), so a fresh interpreter compares a transformers model's logits
before and after `enable_cpu_compat()`, including a `from_pretrained` done
after it, and checks that torch itself still behaves as stock torch.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import sys, torch, transformers
    out = sys.argv[1]
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=250,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(out)
    tokens = torch.arange(40).reshape(2, 20) % 250
    before_model = transformers.Qwen2ForCausalLM.from_pretrained(out)
    before = before_model(tokens).logits

    import megatron.core.tensor_parallel.random as mrandom
    from megatron_gppo.model.cpu_compat import cuda_type_names, enable_cpu_compat
    assert enable_cpu_compat() and enable_cpu_compat()  # idempotent
    assert mrandom.torch is not torch and mrandom.torch.cuda.current_device() == torch.device("cpu")

    after = transformers.Qwen2ForCausalLM.from_pretrained(out)(tokens).logits
    again = before_model(tokens).logits
    assert torch.equal(before, after) and torch.equal(before, again), "HF logits changed"

    # torch itself is stock torch.
    assert torch.zeros(1).type() == "torch.FloatTensor"
    try:
        torch.cuda.current_device()
        raise AssertionError("torch.cuda.current_device() was patched globally")
    except (AssertionError, RuntimeError) as err:
        assert "patched" not in str(err), err
    param = torch.nn.Parameter(torch.zeros(2))
    with cuda_type_names([param]):
        assert param.type() == "torch.cuda.FloatTensor"
    assert param.type() == "torch.FloatTensor" and "type" not in vars(param)
    print("scoped")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the compatibility layer is inactive when CUDA is available")
def test_cpu_compat_leaves_torch_and_hugging_face_alone(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "model")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "scoped" in result.stdout, result.stderr[-3000:]
