"""pytest set-up for the kernel benchmarks (run only when bench/ is named: pytest.ini's
testpaths is tests/):

    pytest bench/ --benchmark-only            # time them (pytest-benchmark)
    pytest bench/ --benchmark-disable -q      # each once, as plain tests
"""
import os
import sys

import torch

# Triton reads TRITON_INTERPRET when a @triton.jit decorator runs, so it must be set before
# any kernel module is imported (the cases modules import them). Without a GPU every kernel
# runs under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # tiny tensors: the intra-op thread pool only adds wake-up stalls (as bench/kernels.py)
    torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401
except ImportError:             # without the plugin: call each function once
    class _Once:
        group = None

        def __init__(self):
            self.extra_info = {}

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

    @pytest.fixture
    def benchmark():
        return _Once()
