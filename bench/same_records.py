"""Are two run folders' records the same but for seconds and memory? (a refactor's check)

    python -m bench.same_records runs/before runs/after

Compares ``rounds.jsonl``, ``verification.jsonl`` and ``tutor.json`` line by line and field by field,
leaving out what a rerun never repeats (wall and CPU seconds, peak memory, the Ray node's id). Prints each difference
(file, line, field path, both values) and exits 1 when there is one, 0 when the records are the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FILES = ("rounds.jsonl", "verification.jsonl", "tutor.json")
# Field names whose values are timings or memory: left out wherever they sit in a record
UNREPEATABLE = ("seconds", "cpu_seconds", "peak_rss_mb", "round_wall_s", "verify_seconds", "wall_s", "server_seconds",
                "ray-node")  # Ray names its node anew in every run


def _records(path: Path) -> list:
    if not path.exists():
        return []
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [json.loads(text)]


def differences(a, b, where: str = "") -> list[str]:
    """Every field path where ``a`` and ``b`` differ (timings and memory left out)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key in UNREPEATABLE:
                continue
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'the first' if key in a else 'the second'}")
            else:
                out += differences(a[key], b[key], f"{where}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} entries against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare_folders(first: Path, second: Path) -> list[str]:
    out = []
    for name in FILES:
        a, b = _records(first / name), _records(second / name)
        if len(a) != len(b):
            out.append(f"{name}: {len(a)} records against {len(b)}")
            continue
        out += [f"{name} line {i + 1}{d}" for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y)]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.same_records", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    for folder in (args.first, args.second):
        if not (folder / "rounds.jsonl").is_file():
            parser.error(f"{folder} is not a run folder (no rounds.jsonl)")
    found = compare_folders(args.first, args.second)
    for line in found:
        print(line)
    counts = {name: len(_records(args.first / name)) for name in FILES}
    print(f"{'the same' if not found else f'{len(found)} differences'} "
          f"({', '.join(f'{n} {name}' for name, n in counts.items())}; seconds and memory left out)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
