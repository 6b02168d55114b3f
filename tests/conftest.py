import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests need a Hopper GPU and the built extension; elsewhere they are skipped, never silently passed."""
    from model.kernels import extension

    have_gpu = torch.cuda.is_available() and extension.available_for(torch.device("cuda", 0))
    skip = pytest.mark.skip(reason="needs an sm_90 GPU and the built _C extension")
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(skip)
