"""The CLI: invalid arguments stop with one clear line before any work; a tiny run writes its folder."""

import json

import pytest

from sim.run import main, parse_args


@pytest.mark.parametrize("argv, message", [
    (["--clients", "0"], "--clients must be at least 1"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--methods", "diredi,fedsgd"], "unknown ['fedsgd']"),
    (["--data", "voc"], "--data voc needs --voc-root"),
    (["--data", "voc", "--voc-root", "/no/such/folder"], "--data voc needs --voc-root"),
    (["--scenario", "no_such_scenario"], "--scenario"),
    (["--profile", "huge"], "invalid choice"),
    (["--rd-iters", "0"], "--rd-iters: must be at least 1"),
])
def test_invalid_arguments_stop_with_one_clear_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_resume_needs_an_existing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--resume", "--out", str(tmp_path), "--name", "nothing-here"])
    assert "holds no earlier run" in capsys.readouterr().err


def test_local_and_oracle_run_end_to_end_and_resume(tmp_path, capsys):
    argv = ["--profile", "smoke", "--clients", "2", "--methods", "local,oracle", "--out", str(tmp_path),
            "--name", "tiny", "--cache", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0
    folder = tmp_path / "tiny"
    for name in ("config.json", "rounds.jsonl", "results.md", "gain_forgetting.png", "round_curves.png"):
        assert (folder / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["client"]) for r in records) == [("local", 0), ("local", 1),
                                                                  ("oracle", 0), ("oracle", 1)]
    assert json.loads((folder / "done.json").read_text()) == ["local", "oracle"]
    assert "run folder:" in capsys.readouterr().out
    # --resume reuses both finished methods: same records, nothing retrained.
    assert main(argv + ["--resume"]) == 0
    again = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    assert again == records
    assert "reusing local, oracle" in capsys.readouterr().out
