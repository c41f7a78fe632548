"""Suite-wide settings: tiny models run fastest single-threaded (thread start-up dominates their ops)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
