import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests need a Hopper GPU and the built extension; elsewhere they are skipped, never silently passed. Those
    also marked `triton_only` need a CUDA GPU and Triton only (so a machine without the build still checks them)."""
    import importlib.util

    from model.kernels import extension

    have_cuda = torch.cuda.is_available()
    have_gpu = have_cuda and extension.available_for(torch.device("cuda", 0))
    have_triton = have_cuda and importlib.util.find_spec("triton") is not None
    skip = pytest.mark.skip(reason="needs an sm_90 GPU and the built _C extension")
    skip_triton = pytest.mark.skip(reason="needs a CUDA GPU and Triton")
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if "triton_only" in item.keywords:
            if not have_triton:
                item.add_marker(skip_triton)
        elif not have_gpu:
            item.add_marker(skip)


@pytest.fixture
def cuda_moe_layer(monkeypatch):
    """`fused_moe` on the CUDA kernels at every size: small experts at decode sizes otherwise take the two Triton
    launches by default (model/kernels/triton_decode_moe.py, which tests/test_triton_decode_moe_gpu.py checks)."""
    from model.kernels import triton_decode_moe

    triton_decode_moe.decode_moe_forced.cache_clear()
    monkeypatch.setenv("STATICMOE_DECODE_MOE", "0")
    yield
    triton_decode_moe.decode_moe_forced.cache_clear()
