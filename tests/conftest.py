import os
import sys

import torch

# Triton reads TRITON_INTERPRET when a @triton.jit decorator runs, so it must be set before
# any kernel module is imported. Without a GPU every kernel test runs under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import importlib.util  # noqa: E402

# make test's venv has torchvision and timm (one pinned stack); an environment without them
# does not collect the tests that need them (rather than skipping them).
collect_ignore = [] if all(importlib.util.find_spec(m) for m in ("torchvision", "timm")) \
    else ["test_peers.py", "test_tv_decode.py"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: end-to-end runs of more than a few seconds")
    config.addinivalue_line("markers", "models: needs torchvision and timm (make test's "
                                       "venv has them)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_outputs():
    """NaN-fill every output buffer the kernels allocate (``fastmix.kernels._common.empty``)."""
    from fastmix.kernels import _common
    old = _common.POISON_OUTPUTS
    _common.POISON_OUTPUTS = True
    yield
    _common.POISON_OUTPUTS = old
