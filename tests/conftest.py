"""Suite-wide settings: tiny models run fastest single-threaded (thread start-up dominates their ops)."""

import os
import sys

import pytest
import torch

# test helper modules shared across test folders (tests/tiny_causal.py, ...)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """family -> folder of a saved tiny pipeline (each family built and saved once per test session)."""
    from longgen.backbones import build_tiny

    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            build_tiny(family).save_pretrained(path)
            cache[family] = str(path)
        return cache[family]

    return get
