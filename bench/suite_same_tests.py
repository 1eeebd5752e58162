"""The test suite then and now, on the same tests: a past commit's whole suite, and today's tests that carry
the same names, each run alone on this machine and timed.

The layout issue asks for a suite faster than its day's (316 s on 2 cores) "with the same tests". The suite
has grown since, so today's whole-suite time says nothing about the tests it had then. Here a test is "the
same" when its test function has the same name (its file may have moved: ``tests/test_strategy.py`` was
split by module); today's every parametrisation of such a function runs.

The past commit runs from a copy extracted with ``git archive`` into a temporary folder, with this
environment's Python and packages (its code shadows the editable install: Python puts the working folder
first). Both suites start from empty caches (pytest's temporary folders), as on a fresh checkout.

    python -m bench.suite_same_tests                 # then: 05174f4, the commit the layout issue read
    python -m bench.suite_same_tests --then <commit> --out experiments/results/suite_same_tests.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models.compute import cpu_model

ROOT = Path(__file__).resolve().parent.parent
# The commit the layout issue describes: strategies/diredi.py of 608 lines, tests/test_strategy.py of 818.
LAYOUT_ISSUE_COMMIT = "05174f4"


def collect(repo: Path) -> list[str]:
    """The node ids pytest collects in ``repo`` (``tests/test_x.py::test_name[params]``)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"python -m bench.suite_same_tests: error: collecting {repo} failed:\n{done.stdout[-2000:]}")
    return [line.strip() for line in done.stdout.splitlines() if "::" in line]


def test_function(node_id: str) -> str:
    """``tests/a.py::test_b[x]`` -> ``test_b``: the name a test keeps when its file moves."""
    return node_id.split("::", 1)[1].split("[", 1)[0]


def same_tests(then: list[str], now: list[str]) -> tuple[list[str], list[str]]:
    """Today's node ids whose test function existed then, and the functions of then that are gone."""
    functions_now = {test_function(t) for t in now}
    functions_then = {test_function(t) for t in then}
    return ([t for t in now if test_function(t) in functions_then],
            sorted(functions_then - functions_now))


def timed_suite(repo: Path, node_ids: list[str] | None = None) -> dict:
    """Run pytest in ``repo`` (every test, or ``node_ids``) and time it; pytest's own last line kept."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    with tempfile.TemporaryDirectory() as tmp:
        if node_ids is not None:  # one id per line: pytest reads arguments from an @file
            ids = Path(tmp) / "ids.txt"
            ids.write_text("\n".join(node_ids) + "\n")
            argv.append(f"@{ids}")
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=repo, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    return {"wall_s": round(seconds, 1), "exit_code": done.returncode, "pytest": lines[-1] if lines else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite_same_tests", description=__doc__.split("\n\n")[0])
    parser.add_argument("--then", default=LAYOUT_ISSUE_COMMIT, help="the past commit (default: the layout issue's)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "suite_same_tests.json")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{args.then}^{{commit}}"], cwd=ROOT,
                            capture_output=True, text=True)
    if commit.returncode != 0:
        parser.error(f"--then: {args.then!r} is not a commit of this repository")
    now_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        then_repo = Path(tmp) / "then"
        then_repo.mkdir()
        archive = subprocess.run(["git", "archive", commit.stdout.strip()], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(then_repo)], input=archive.stdout, check=True)
        then_ids, now_ids = collect(then_repo), collect(ROOT)
        same, gone = same_tests(then_ids, now_ids)
        print(f"then {args.then}: {len(then_ids)} tests; now: {len(now_ids)}, of which {len(same)} carry a name of "
              f"then ({len(gone)} test functions of then are gone)", flush=True)
        print("running the suite of then ...", flush=True)
        then_run = timed_suite(then_repo)
        print(f"  {then_run['wall_s']} s: {then_run['pytest']}", flush=True)
    print("running today's same tests ...", flush=True)
    now_run = timed_suite(ROOT, same)
    print(f"  {now_run['wall_s']} s: {now_run['pytest']}", flush=True)
    result = {"command": " ".join(["python -m bench.suite_same_tests", *(argv if argv is not None else sys.argv[1:])]),
              "cpu": cpu_model(), "cores": os.cpu_count(),
              "then": {"commit": commit.stdout.strip(), "tests": len(then_ids), **then_run},
              "now": {"commit": now_commit, "tests_same_names": len(same), "tests_all": len(now_ids), **now_run},
              "functions_gone": gone}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if then_run["exit_code"] == 0 and now_run["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
