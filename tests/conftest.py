"""Test settings shared by the whole suite.

Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter,
which must be switched on before Triton is first imported: hence here. With a
GPU they run compiled, and the tests marked ``gpu`` run too.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("dsinfra", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("dsinfra")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where Triton kernels run in this session: the GPU, or the CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
