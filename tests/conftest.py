"""Test-wide settings."""

import os

import pytest
import torch

# One torch thread: the suite's models are tiny, and on a shared 2-core machine more threads than
# free cores slow torch down many times over (Ray's client actors set their own count).
torch.set_num_threads(1)

_suite_ray_cluster = None


def pytest_collection_finish(session):
    """One Ray cluster for every federation of the suite, started once when a selected test is marked
    ``slow``: each simulation joins it through ``RAY_ADDRESS`` (``sim.federation.ray_init_args``, also in
    the ``sim.run`` subprocesses that inherit the variable) instead of starting and stopping its own Ray
    instance, several seconds of a 2-core machine each time. Joining still gives each federation its own
    Ray job, so its client actors are its own. A cluster the caller names in ``RAY_ADDRESS`` is used as is."""
    global _suite_ray_cluster
    if os.environ.get("RAY_ADDRESS") or not any(item.get_closest_marker("slow") for item in session.items):
        return
    from ray.cluster_utils import Cluster

    _suite_ray_cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": os.cpu_count() or 1, "num_gpus": torch.cuda.device_count(),
        "object_store_memory": 512 * 1024 * 1024, "include_dashboard": False})
    os.environ["RAY_ADDRESS"] = _suite_ray_cluster.address


def pytest_sessionfinish(session, exitstatus):
    if _suite_ray_cluster is not None:
        os.environ.pop("RAY_ADDRESS", None)
        _suite_ray_cluster.shutdown()


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


class SmokeRuns:
    """Runs of one configuration (smoke profile, 2 clients, 2 rounds of DiReDi and FedAvg) that tests
    compare record by record with one simulated reference run, made once for the suite.

    Each run is ``<root>/<tag>/run``, tags of three letters: the clients' state folder travels in the
    configuration and its bytes are counted, so every run folder's path has the same length."""

    settings = ["--profile", "smoke", "--clients", "2", "--rounds", "2", "--methods", "diredi,fedavg", "--quiet"]
    name = "run"

    def __init__(self, root, cache) -> None:
        self.root, self.cache = root, cache
        self._reference = None

    def out(self, tag: str):
        """A fresh output folder ``<root>/<tag>`` (its run is ``<root>/<tag>/run``)."""
        assert len(tag) == 3, tag
        folder = self.root / tag
        folder.mkdir()
        return folder

    def argv(self, out) -> list[str]:
        return [*self.settings, "--cache", str(self.cache), "--out", str(out), "--name", self.name]

    @property
    def reference(self):
        """The simulated run's folder (run in this process, one torch thread, the first time it is asked for)."""
        if self._reference is None:
            from sim.run import main as sim_main

            out = self.out("ref")
            assert sim_main(self.argv(out)) == 0
            self._reference = out / self.name
        return self._reference


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory, smoke_cache):
    return SmokeRuns(tmp_path_factory.mktemp("runs"), smoke_cache)
