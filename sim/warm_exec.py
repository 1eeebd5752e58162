"""A SuperExec for one SuperNode whose ClientApp processes start warm: each message is handled in a
fork of a process that has imported torch and torchvision already.

Flower's SuperNode runs every message in a new ``flwr-clientapp`` process (``--isolation
subprocess``), and each of them imports torch and torchvision again: 2.9 s of CPU per message here
(``python -X importtime -c "import clients.app"``), for a smoke-profile client whose training takes
0.2-0.5 s. With ``flower-supernode --isolation process`` the SuperNode leaves the starting to a
SuperExec of our choosing; this one is Flower's own (``run_superexec``: the same polling, tokens
and Runtime API) with one change, its executor: a task is a ``fork()`` of this process running
Flower's ``run_clientapp``, the function ``flwr-clientapp`` runs. A task still gets a process of its
own (isolation, memory returned at its end) and still loads the ClientApp from the FAB the SuperNode
received: only third-party modules are imported ahead, never the app's own.

    python -m sim.warm_exec --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid <supernode pid>

``sim.deploy`` starts one per SuperNode. Linux and macOS only (``fork``). Written against Flower
1.41's SuperExec (pinned in pyproject.toml).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# What the ClientApp imports from outside the app (the expensive part of starting it).
WARM_MODULES = ("torch", "torchvision", "torchvision.ops", "torchvision.models", "numpy", "PIL.Image",
                "safetensors.torch", "yaml", "flwr.app", "flwr.clientapp")


class ForkExecutor:
    """Flower's SuperExec executor interface (``flwr.supercore.superexec.executor``): ``launch``
    forks a child that runs one ClientApp task and exits; ``reconcile`` reaps the finished ones."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return supported_task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"this SuperExec runs ClientApps only, not {spec.task_type}")
        pid = os.fork()
        if pid == 0:  # the task
            os._exit(run_task(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        self.reconcile()


def run_task(spec) -> int:
    """One ClientApp task in this (forked) process, as ``flwr-clientapp --token ...`` runs it."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    try:
        run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                      certificates=validate_and_resolve_root_certificates(spec.root_certificates_path,
                                                                          spec.insecure),
                      parent_pid=None, runtime_dependency_install=False)
    except SystemExit as done:  # run_clientapp ends with flwr_exit
        return done.code if isinstance(done.code, int) else 0
    except BaseException:  # noqa: BLE001 - a task's failure must not escape into the parent's code
        traceback.print_exc()
        return 1
    return 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.warm_exec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process ends")
    args = parser.parse_args(argv)
    for name in WARM_MODULES:
        importlib.import_module(name)
    from flwr.supercore.superexec import run_superexec as superexec

    superexec.get_executor = lambda *_, **__: ForkExecutor()  # the one change to Flower's SuperExec
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=args.insecure,
                            root_certificates_path=args.root_certificates, parent_pid=args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
