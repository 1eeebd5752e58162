"""The code passes ruff's checks (pyflakes and pycodestyle's errors; the rules in pyproject.toml) and
the import contract (``[tool.importlinter]`` in pyproject.toml: which package may import which)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).with_name(name))


def test_ruff_finds_nothing():
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def lint_imports(*config: str) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("lint-imports"), "--no-cache", *config], capture_output=True, text=True, cwd=ROOT)


def test_the_layers_hold():
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_import_contract_sees_a_broken_layer(tmp_path):
    # The same packages with sim/ declared below models/: sim.run imports models, so this must break
    # (the contract above is checked on the real import graph, not passed vacuously).
    config = tmp_path / "reversed.ini"
    config.write_text("[importlinter]\nroot_packages =\n    sim\n    models\ninclude_external_packages = False\n\n"
                      "[importlinter:contract:reversed]\nname = models above sim\ntype = layers\n"
                      "layers =\n    models\n    sim\n")
    result = lint_imports("--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and "sim." in result.stdout
