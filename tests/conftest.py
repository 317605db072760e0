"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tests use tiny matrices: one intra-op thread is fastest and keeps the suite fast on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
