"""Test-wide settings."""

import pytest
import torch

# One torch thread: the suite's models are tiny, and on a shared 2-core machine more threads than
# free cores slow torch down many times over (Ray's client actors set their own count).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def threads_one():
    """One torch thread for the test's server side: its share of the work is tiny; leave the cores to
    the Flower clients (Ray actors set their own count). The count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
