"""Shared test settings: every test runs torch on one intra-op thread.

The tiny models gain little from more threads, and on a shared 2-core CPU several threads stall each other.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
