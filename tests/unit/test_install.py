"""The CPU install path must not pull CUDA wheels."""

from importlib import metadata

import pytest
import torch


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch brings nvidia-* wheels by design")
def test_cpu_install_has_no_nvidia_wheels():
    names = sorted(dist.metadata["Name"] for dist in metadata.distributions())
    assert not [name for name in names if name.lower().startswith("nvidia")], names


def test_no_transformer_engine_on_cpu():
    # Its empty meta-package breaks `import megatron.core` on CPU machines.
    if torch.cuda.is_available():
        pytest.skip("GPU machine")
    names = {dist.metadata["Name"].lower() for dist in metadata.distributions()}
    assert "transformer-engine" not in names and "transformer_engine" not in names
    import megatron.core  # noqa: F401  (must import cleanly)
