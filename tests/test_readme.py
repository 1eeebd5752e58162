"""The README's quick-start test command is exactly what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci/run").read_text().splitlines()
                  if line.startswith("python3 -m venv")]
    assert len(ci_command) == 1
    readme_lines = (ROOT / "README.md").read_text().splitlines()
    assert ci_command[0] in readme_lines
