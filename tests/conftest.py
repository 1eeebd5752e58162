"""Test-wide settings."""

import pytest
import torch

# One torch thread: the suite's models are tiny, and on a shared 2-core machine more threads than
# free cores slow torch down many times over (Ray's client actors set their own count).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
    """One cache folder for the whole suite: the synthetic data and the manufacturer's chain are keyed by
    what they are built from, so a test reads what an earlier one built instead of building it again.
    Tests of the cache itself (reuse, corruption) keep their own folders."""
    return tmp_path_factory.mktemp("smoke-cache")


@pytest.fixture(scope="module")
def threads_one():
    """One torch thread for the test's server side: its share of the work is tiny; leave the cores to
    the Flower clients (Ray actors set their own count). The count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
