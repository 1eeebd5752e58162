"""A local deployment: Flower's Deployment Runtime with a SuperLink and N SuperNodes on this machine.

    python -m sim.deploy --nodes 2 --run-config "profile='smoke' rounds=2 methods='diredi,fedavg'"
    python -m sim.deploy --nodes 8                                # the default run, deployed

What a real deployment does on several machines, done here with one process per role:

1. ``flower-superlink --insecure`` (the server side; it starts the ServerApp when a run arrives);
2. one ``flower-supernode`` per client, each with its own partition and its own folders in its node
   config (``partition-id``, ``num-partitions``, ``cache-dir``, ``state-dir``): a node generates the
   synthetic data into its own cache and keeps its state in its own folder, and reads nothing from
   the server's (``clients.app.node_run_config``);
3. a Flower configuration entry for that SuperLink (in ``<home>/cli/config.toml``, ``FLWR_HOME``: the
   user's own ``~/.flwr`` is left alone), then ``flwr run <app> local --stream``, whose log lines are
   streamed here.

Every process it started (and their children: SuperExec, ServerApp and ClientApp processes) is
stopped at the end, also on Ctrl-C, a failure or ``--timeout``. The run folder is
``<out>/<name>`` as with ``python -m sim.run``; ``<home>`` keeps each process's log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PROG = "python -m sim.deploy"
APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app: this project (pyproject.toml)
# Run-config keys the launcher sets itself: the node count, and absolute paths (the ServerApp runs in a
# process of its own, whose working directory is not this one).
LAUNCHER_KEYS = ("num-clients", "out-dir", "name", "cache-dir")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config(partition: int, nodes: int, folder: Path) -> str:
    """A SuperNode's ``--node-config``: its partition and its own folders."""
    return (f"partition-id={partition} num-partitions={nodes} cache-dir='{folder / 'cache'}' "
            f"state-dir='{folder / 'state'}'")


def flower_config(superlink: str) -> str:
    """The Flower configuration file's entry for the local SuperLink (``flwr run . local``)."""
    return f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{superlink}"\ninsecure = true\n'


def parse_run_config(text: str) -> dict[str, str]:
    """``k=v k2='v 2'`` -> {k: v}; values stay TOML text (``flwr run`` parses them)."""
    out = {}
    for item in shlex.split(text, posix=False):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--run-config: {item!r} is not key=value")
        out[key] = value
    return out


def check_run_config(overrides: dict[str, str], nodes: int, cache: Path) -> None:
    """Raises ValueError (one line) for what ``flwr run`` would reject or the ServerApp would fail on:
    a key the app does not declare, a value that is not TOML, a setting ``resolve_run_config`` refuses."""
    import tomllib

    from protocol.config import ConfigError, resolve_run_config

    declared = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ValueError(f"--run-config: unknown key {', '.join(unknown)}; the keys are those of "
                         "[tool.flwr.app.config] in pyproject.toml")
    values = {}
    for key, text in overrides.items():
        try:
            values[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"--run-config: {key}={text} is not a TOML value (quote strings: {key}='...')") from None
    raw = {k: v for k, v in {**declared, **values}.items() if k not in ("out-dir", "name")}
    try:
        resolve_run_config({**raw, "num-clients": nodes, "cache-dir": str(cache)})
    except ConfigError as err:
        raise ValueError(f"--run-config: {err}") from None


def run_config_text(overrides: dict[str, str], nodes: int, out: Path, name: str, cache: Path) -> str:
    values = {**overrides, "num-clients": str(nodes), "out-dir": f"'{out}'", "name": f"'{name}'",
              "cache-dir": f"'{cache}'"}
    return " ".join(f"{k}={v}" for k, v in values.items())


class Processes:
    """The processes this launcher started, each in its own process group (its children with it), all
    stopped by ``stop``: SIGTERM to every group, SIGKILL to what is left after ``grace_s``."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.logs: list = []

    def start(self, name: str, command: list[str], log: Path | None, env: dict[str, str],
              cwd: Path | None = None) -> subprocess.Popen:
        """``command`` in a session of its own, its output into ``log`` (None: a pipe to read)."""
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            self.logs.append(open(log, "wb"))
        proc = subprocess.Popen(command, stdout=self.logs[-1] if log is not None else subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def failed(self) -> str | None:
        """The name and exit code of a started process that ended while it should run."""
        for name, proc in self.started:
            if proc.poll() is not None and name != "flwr run":
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """Stops every started process and every descendant (Flower detaches SuperExec into a session
        of its own, so process groups alone miss it); returns the pids it signalled."""
        pids = {proc.pid for _, proc in self.started if proc.poll() is None}
        for _, proc in self.started:
            pids |= descendants(proc.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            for _, proc in self.started:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            while time.monotonic() < deadline and any(alive(pid) for pid in pids):
                time.sleep(0.1)
            if not any(alive(pid) for pid in pids):
                break
        for log in self.logs:
            log.close()
        return sorted(pids)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc; elsewhere none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:  # a zombie has ended; only its parent's wait is missing
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_port(port: int, timeout_s: float, processes: Processes) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if (problem := processes.failed()) is not None:
            raise RuntimeError(problem)
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s:.0f} s")


def run_status(bin_dir: Path, run_id: str, env: dict[str, str]) -> str:
    """The SuperLink's status of run ``run_id`` ("finished:completed", "finished:failed", ...)."""
    listed = subprocess.run([str(bin_dir / "flwr"), "ls", "local", "--run-id", run_id, "--format", "json"],
                            capture_output=True, text=True, env=env, timeout=60)
    try:
        runs = json.loads(listed.stdout).get("runs") or []
        return str(runs[0]["status"]) if runs else "unknown"
    except (ValueError, KeyError, AttributeError):
        return f"unknown ({' '.join(listed.stdout.split())[:200]})"


def deploy(nodes: int, overrides: dict[str, str], home: Path, out: Path, name: str, cache: Path,
           timeout_s: float, threads: int = 1, server_threads: int | None = None, echo=print) -> int:
    """Starts the SuperLink and ``nodes`` SuperNodes, runs the app with ``flwr run``, streams its log
    through ``echo``, stops everything; returns ``flwr run``'s exit code (1 when the run failed).
    ``threads``: each client's torch
    threads (the simulation's actors use 1); ``server_threads``: the ServerApp's (None: torch's default,
    as ``sim.run``'s driver). Thread counts change the last bits of a float sum, so a comparison with
    a simulation needs both equal."""
    home, out, cache = home.resolve(), out.resolve(), cache.resolve()
    home.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    processes = Processes()
    # Clients train with as many torch threads as the simulation's actors (Ray sets OMP_NUM_THREADS=1),
    # the server with as many as the simulation's driver: both runtimes compute the same numbers.
    # SuperExec looks for new tasks every second by default; a message waits for that poll
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # Flower starts its own commands

    def env(role: str) -> dict[str, str]:
        (home / role / "flwr").mkdir(parents=True, exist_ok=True)
        count = threads if role.startswith("node") else server_threads if role == "superlink" else None
        threads_env = {"OMP_NUM_THREADS": str(count)} if count else {}
        return {**base_env, **threads_env, "FLWR_HOME": str(home / role / "flwr")}  # each role its own Flower home

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in previous:
        signal.signal(sig, interrupted)
    try:
        port = free_port()
        superlink = f"127.0.0.1:{port}"
        # --disable-runtime-dependency-installation: the ServerApp runs in this environment (else the
        # SuperLink builds a fresh one per run with `uv sync`: 42 s here, and a download elsewhere)
        processes.start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                      "--port", str(port), "--disable-runtime-dependency-installation"],
                        home / "superlink.log", env("superlink"), cwd=home)
        wait_for_port(port, 60, processes)
        for i in range(nodes):
            folder, runtime_port = home / f"node-{i}", free_port()
            processes.start(f"supernode {i}", [str(bin_dir / "flower-supernode"), "--insecure", "--superlink",
                                               superlink, "--port", str(runtime_port),
                                               "--node-config", node_config(i, nodes, folder)],
                            folder / "supernode.log", env(f"node-{i}"), cwd=folder)
        cli_env = env("cli")
        (home / "cli" / "flwr" / "config.toml").write_text(flower_config(superlink))
        command = [str(bin_dir / "flwr"), "run", str(APP_DIR), "local", "--stream",
                   "--run-config", run_config_text(overrides, nodes, out, name, cache)]
        echo(f"{PROG}: superlink {superlink}, {nodes} supernodes; {' '.join(shlex.quote(c) for c in command)}")
        run, started = processes.start("flwr run", command, None, cli_env), time.monotonic()
        deadline = time.monotonic() + timeout_s
        timer = threading.Timer(timeout_s, lambda: os.killpg(run.pid, signal.SIGTERM))
        timer.daemon = True
        timer.start()
        run_id = None
        for raw in run.stdout:  # the run's streamed log, until the run ends
            line = raw.decode(errors="replace").rstrip()
            run_id = run_id or (m.group(1) if (m := re.search(r"started run (\d+)", line)) else None)
            echo(f"[{time.monotonic() - started:6.1f} s] {line}")  # seconds since `flwr run` started
        code = run.wait()
        timer.cancel()
        if time.monotonic() > deadline:
            echo(f"{PROG}: stopped after --timeout {timeout_s:.0f} s")
            return 124
        if (problem := processes.failed()) is not None:
            echo(f"{PROG}: {problem} (log in {home})")
            return code or 1
        if code == 0 and run_id is not None:  # `flwr run --stream` exits 0 when the ServerApp failed
            status = run_status(bin_dir, run_id, cli_env)
            if "completed" not in status:
                echo(f"{PROG}: the run ended {status!r} (the ServerApp's log is above)")
                return 1
        return code
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        processes.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=8, help="SuperNodes (= clients; default 8)")
    parser.add_argument("--run-config", default="",
                        help="run-config overrides as for flwr run, e.g. \"profile='smoke' rounds=2\"")
    parser.add_argument("--home", type=Path, default=Path("runs/deploy"),
                        help="the processes' folders and logs (node-<i>/ holds a node's cache and state)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of run folders")
    parser.add_argument("--name", default="", help="run folder name (default: derived from the settings)")
    parser.add_argument("--cache", type=Path, default=Path(".cache"),
                        help="the server's data and model cache (the manufacturer chain)")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds before everything is stopped")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes must be at least 1, got {args.nodes}")
    try:
        overrides = parse_run_config(args.run_config)
    except ValueError as err:
        parser.error(str(err))
    taken = sorted(set(overrides) & set(LAUNCHER_KEYS))
    if taken:
        parser.error(f"--run-config: {', '.join(taken)} are set by the launcher (--nodes, --out, --name, --cache)")
    try:
        check_run_config(overrides, args.nodes, args.cache)
    except ValueError as err:
        parser.error(str(err))
    try:
        return deploy(args.nodes, overrides, args.home, args.out, args.name, args.cache, args.timeout)
    except KeyboardInterrupt as err:
        print(f"{PROG}: interrupted ({err or 'SIGINT'}); every process it started is stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
