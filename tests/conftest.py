"""Shared test settings."""

import os

# Triton kernels run on CPU tensors in Triton's interpreter: it must be switched on before Triton is imported
# (lowmem imports it only when a kernel runs); on a machine with a GPU, unset it to test the compiled kernels.
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
