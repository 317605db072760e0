"""Shared test settings."""

import os

# Triton kernels run on CPU tensors in Triton's interpreter: it must be switched on before Triton is imported
# (lowmem imports it only when a kernel runs). The tests build CPU tensors, so they check the kernels' semantics
# here on any machine; tests/compile_kernels.py checks that they compile for GPUs, and
# benchmarks/bench_kernels_gpu.py runs them on one.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tests use tiny matrices: one intra-op thread is fastest and keeps the suite fast on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
