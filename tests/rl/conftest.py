"""Shared fixtures of the RL tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module (tiny models: two threads only add contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
