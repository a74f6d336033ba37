"""Test setup. TRITON_INTERPRET must be set before anything imports triton, and only without a GPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one CPU thread per xdist worker (and the processes it spawns):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers x intra-op threads beyond the cores spin and stall
    torch.set_num_threads(1)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("sparsezoo", max_examples=12, deadline=None, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sparsezoo"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
