"""The CLI: invalid arguments stop with one clear line before any work; a tiny run writes its folder."""

import json

import pytest

from protocol.config import evaluation_round, resolve_run_config
from sim.run import main, parse_args


def test_clients_evaluate_every_kth_round_and_the_last():
    assert [r for r in range(1, 8) if evaluation_round(r, 7, 3)] == [3, 6, 7]
    assert [r for r in range(1, 5) if evaluation_round(r, 4, 1)] == [1, 2, 3, 4]
    config = resolve_run_config({"rounds": 5, "eval-every": 2})
    assert [r for r in range(1, 6) if config.evaluates_after(r)] == [2, 4, 5]
    # "before": round 1's edge (every figure's start), else only an edge an evaluated round ended with
    assert [r for r in range(1, 6) if config.evaluates_before(r)] == [1, 3, 5]


@pytest.mark.parametrize("argv, message", [
    (["--clients", "0"], "--clients must be at least 1"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--methods", "diredi,fedsgd"], "unknown ['fedsgd']"),
    (["--data", "voc"], "--data voc needs --voc-root"),
    (["--data", "voc", "--voc-root", "/no/such/folder"], "--data voc needs --voc-root"),
    (["--scenario", "no_such_scenario"], "--scenario"),
    (["--profile", "huge"], "invalid choice"),
    (["--rd-iters", "-1"], "--rd-iters must be at least 0, got -1"),
    (["--rounds", "two"], "--rounds: invalid int value: 'two'"),
    (["--edge-check", "on", "--redistill", "server"], "--edge-check checks the edges clients re-distil; it needs "
                                                      "--redistill client"),
    (["--spread", "yes"], "invalid choice"),
    (["--spread-rows", "spread"], "invalid choice"),
    (["--spread", "off", "--spread-scores", "others"], "--spread-scores adds the classes of other clients that spread "
                                                       "brings; it needs --spread on"),
    (["--spread", "off", "--spread-average", "server"], "--spread-average averages with the server's spread edge; it "
                                                        "needs --spread on"),
    (["--spread", "on", "--spread-average", "server", "--edge-average", "1"], "--spread-average sets the partner of "
                                                                              "the edge average; --edge-average 1 "
                                                                              "averages nothing"),
    (["--spread", "on", "--spread-average", "spread"], "invalid choice"),
    (["--spread", "off", "--spread-iters", "72"], "--spread-iters sets the server's spread distillation; it needs "
                                                  "--spread on"),
    (["--spread", "on", "--spread-iters", "-1"], "--spread-iters must be at least 0, got -1"),
    (["--edge-average", "1.5"], "--edge-average must be in (0, 1] (0: the default), got 1.5"),
    (["--edge-average", "0.5", "--redistill", "server"], "--edge-average averages the edges clients re-distil"),
    (["--claims", "believed"], "invalid choice"),
    (["--clip-multiple", "0.5"], "--clip-multiple must be a number >= 1 (inf: no clipping), got 0.5"),
    (["--operating-threshold", "1.5"], "--operating-threshold must be a number in [0.05, 1), got 1.5"),
    (["--row-multiple", "0"], "--row-multiple must be a number >= 1 (inf: no clipping), got 0.0"),
])
def test_invalid_arguments_stop_with_one_clear_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_every_run_config_field_has_a_flag_whose_value_reaches_the_run(tmp_path):
    """The CLI and ``flwr run`` share one configuration surface: every ``RunConfig`` field has a flag
    (``--help`` lists it), and a value given there is the run's."""
    import dataclasses

    from protocol.config import RunConfig
    from sim.run import build_parser, flag_of

    flags = {option for action in build_parser()._actions for option in action.option_strings}
    assert [f.name for f in dataclasses.fields(RunConfig) if flag_of(f.name) not in flags] == []
    config = parse_args(["--weight-cap", "2", "--direction-reference", "server", "--timeout-s", "30",
                         "--fedadam-eta", "0.01", "--eval-every", "3", "--out", str(tmp_path)]).config
    assert (config.weight_cap, config.direction_reference, config.timeout_s, config.fedadam_eta,
            config.eval_every) == (2.0, "server", 30.0, 0.01, 3)


def test_the_flags_are_the_run_config_fields_grouped_by_concern():
    """Each ``RunConfig`` field is one flag named by its run-config key (two have a shorter name too), in
    the --help section its field names, with the field's default and choices; no other flag is a setting."""
    import dataclasses

    from protocol.config import GROUPS, RunConfig, choices_of
    from sim.run import SHORT_FLAGS, build_parser

    parser = build_parser()
    by_dest = {action.dest: action for action in parser._actions}
    for f in dataclasses.fields(RunConfig):
        action = by_dest[f.name]
        key = f.name.replace("_", "-")
        assert f"--{key}" in action.option_strings and (key not in SHORT_FLAGS or SHORT_FLAGS[key] in action.option_strings)
        assert action.container.title == f.metadata["group"]
        assert action.choices == choices_of(f)
        assert f.metadata["help"] in action.help
    titles = [group.title for group in parser._action_groups]
    assert [t for t in titles if t in GROUPS] == list(GROUPS)  # every section, in order
    others = {a.dest for a in parser._actions} - {f.name for f in dataclasses.fields(RunConfig)}
    assert others == {"help", "out", "name", "resume", "redo", "quiet", "ray_address"}
    help_text = " ".join(parser.format_help().split())
    assert "--num-clients NUM_CLIENTS" in help_text and "(default diredi,fedavg,fedprox,local,oracle)" in help_text
    assert "per round (0: the profile's) (default 0)" in help_text and "(default inf)" in help_text


def test_a_run_folder_written_before_a_field_existed_still_resumes():
    """config.json lists every field; an older one lacks the fields added since, which hold their defaults."""
    from protocol.config import RunConfig

    now = json.loads(json.dumps(resolve_run_config({"rounds": 3}).to_dict()))
    older = {k: v for k, v in now.items() if k not in ("spread_average", "spread_own_rows")}
    assert RunConfig.completed(older) == RunConfig.completed(now)
    assert RunConfig.completed({**older, "rounds": 4}) != RunConfig.completed(now)
    changed = json.loads(json.dumps(resolve_run_config({"rounds": 3, "spread-average": "server"}).to_dict()))
    assert RunConfig.completed(older) != RunConfig.completed(changed)


def test_a_run_folder_from_before_a_default_changed_reads_as_what_it_ran():
    """Distill C's lr 3e-3, score weight 4 and edge average 0.5 became defaults after runs were recorded
    without those fields: such a folder ran the paper's Distill C, and reads so (``BEFORE_CHANGED``)."""
    from protocol.config import RunConfig

    now = json.loads(json.dumps(resolve_run_config({"rounds": 3}).to_dict()))
    assert (now["redistill_lr"], now["redistill_score_weight"], now["edge_average"]) == (3e-3, 4.0, 0.5)
    older = {k: v for k, v in now.items() if k not in ("redistill_lr", "redistill_score_weight", "edge_average")}
    assert RunConfig.completed(older) != RunConfig.completed(now)
    paper = json.loads(json.dumps(resolve_run_config({"rounds": 3, "redistill-lr": 0, "redistill-score-weight": 0,
                                                      "edge-average": 1}).to_dict()))
    assert RunConfig.completed(older) == RunConfig.completed(paper)
    # spread's rows from the server became the default after the spread runs without the field
    assert now["spread_rows"] == "server"
    before_rows = {k: v for k, v in now.items() if k != "spread_rows"}
    distilled = json.loads(json.dumps(resolve_run_config({"rounds": 3, "spread-rows": "distilled"}).to_dict()))
    assert RunConfig.completed(before_rows) == RunConfig.completed(distilled) != RunConfig.completed(now)
    # spread became the default after runs were recorded without it (nor its steps): they did not spread
    assert (now["spread"], now["spread_iters"]) == ("on", 144)
    before_spread = {k: v for k, v in now.items() if k not in ("spread", "spread_iters")}
    off = json.loads(json.dumps(resolve_run_config({"rounds": 3, "spread": "off"}).to_dict()))
    assert RunConfig.completed(before_spread) == RunConfig.completed(off) != RunConfig.completed(now)


def test_the_edge_average_default_follows_where_distill_c_runs():
    """0 (the default) resolves to 0.5 when clients re-distil, 1 (no averaging) when the server does;
    an explicit share stays, and one below 1 with server re-distillation is refused (the table above)."""
    assert resolve_run_config({}).edge_average == 0.5
    assert resolve_run_config({"redistill": "server"}).edge_average == 1.0
    # spread (on by default) starts the clients' Distill C: with the server re-distilling there is none
    assert resolve_run_config({}).spread == "on" and resolve_run_config({"redistill": "server"}).spread == "off"
    assert resolve_run_config({"redistill": "server", "spread": "on"}).spread_iters == 0
    assert resolve_run_config({"edge-average": 0.25}).edge_average == 0.25
    assert resolve_run_config(resolve_run_config({})).edge_average == 0.5  # resolving again changes nothing


def test_resume_needs_an_existing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--resume", "--out", str(tmp_path), "--name", "nothing-here"])
    assert "holds no earlier run" in capsys.readouterr().err


def test_redo_needs_resume_and_one_of_the_run_s_methods(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--redo", "diredi", "--out", str(tmp_path)])
    assert "only with --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--resume", "--redo", "fedavgm", "--methods", "diredi,local", "--out", str(tmp_path)])
    assert "not a subset of --methods diredi,local" in capsys.readouterr().err


def test_redo_drops_a_method_s_records_and_lets_diredi_s_own_settings_change(tmp_path):
    """--resume --redo diredi: DiReDi's records, decisions, tutor history, checkpoint and client state go and
    it runs again, with other DiReDi settings if asked; the other methods' records stay. Without --redo a
    folder holding DiReDi's records refuses other DiReDi settings, and nothing is dropped."""
    from report.writer import RunFolder

    def settings(**changed) -> dict:
        return json.loads(json.dumps(resolve_run_config({"rounds": 2, "methods": "diredi,fedavg", **changed}).to_dict()))

    folder = RunFolder.start(tmp_path / "run", settings(), {"command": "first"})
    for method in ("fedavg", "diredi"):
        for server_round in (1, 2):
            folder.append_record({"method": method, "round": server_round, "client": 0})
    folder.append_verification({"client": 0, "round": 1, "accepted": True})
    folder.write_json("tutor.json", [{"round": 1}])
    folder.write_done(["fedavg", "diredi"])
    (folder.checkpoints_path).mkdir()
    (folder.checkpoints_path / "diredi.json").write_text(json.dumps({"round": 2}))
    records = folder.read_records()
    lifting = settings(claims="lifting")

    assert "--redo diredi drops its records" in RunFolder.resume_problem(folder.path, lifting)
    with pytest.raises(ValueError):
        RunFolder.start(folder.path, lifting, resume=True)
    assert folder.read_records() == records and folder.read_done() == ["fedavg", "diredi"]  # nothing lost
    assert "other settings" in RunFolder.resume_problem(folder.path, settings(rounds=3), ("diredi",))
    assert RunFolder.resume_problem(folder.path, lifting, ("diredi",)) is None

    again = RunFolder.start(folder.path, lifting, {"command": "again"}, resume=True, redo=("diredi",))
    assert again.read_records() == [r for r in records if r["method"] == "fedavg"]
    assert again.read_done() == ["fedavg"] and again.read_verification() == []
    assert not (again.path / "tutor.json").exists() and not (again.path / "checkpoints").exists()
    assert again.read_config()["run"]["claims"] == "lifting"
    assert RunFolder.resume_problem(again.path, lifting) is None  # DiReDi now runs with the new settings


@pytest.mark.slow
def test_local_and_oracle_run_end_to_end_and_resume(tmp_path, smoke_cache, capsys):
    argv = ["--profile", "smoke", "--clients", "2", "--rounds", "2", "--methods", "local,oracle", "--out", str(tmp_path),
            "--name", "tiny", "--cache", str(smoke_cache), "--quiet"]
    assert main(argv) == 0
    folder = tmp_path / "tiny"
    for name in ("config.json", "rounds.jsonl", "results.md", "gain_forgetting.png", "round_curves.png"):
        assert (folder / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["round"], r["client"]) for r in records) == [
        (method, rnd, client) for method in ("local", "oracle") for rnd in (1, 2) for client in (0, 1)]
    assert json.loads((folder / "done.json").read_text()) == ["local", "oracle"]
    assert "run folder:" in capsys.readouterr().out
    # --resume reuses both finished methods: same records, nothing retrained.
    assert main(argv + ["--resume"]) == 0
    again = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    assert again == records
    assert "reusing local, oracle" in capsys.readouterr().out


def write_voc2007(devkit, broken: str) -> None:
    """A minimal VOCdevkit/VOC2007: two tiny images, one valid annotation and one truncated one."""
    from PIL import Image

    voc = devkit / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    for image_id in ("000001", broken):
        Image.new("RGB", (16, 12), (10, 200, 30)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    (voc / "Annotations" / "000001.xml").write_text(
        "<annotation><filename>000001.jpg</filename><size><width>16</width><height>12</height></size>"
        "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>8</xmax><ymax>8</ymax></bndbox></object></annotation>")
    (voc / "Annotations" / f"{broken}.xml").write_text("<annotation><filename>00")  # cut off mid-file
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text(f"000001\n{broken}\n")


def run_voc(voc_root, tmp_path, capsys) -> tuple[int, list[str]]:
    """Runs the CLI on ``voc_root``; returns the exit code and stderr's lines."""
    code = main(["--data", "voc", "--voc-root", str(voc_root), "--profile", "smoke", "--clients", "2",
                 "--out", str(tmp_path / "runs"), "--name", "bad", "--cache", str(tmp_path / "cache"), "--quiet"])
    return code, capsys.readouterr().err.splitlines()


def test_malformed_voc_annotation_stops_with_one_line_naming_the_file(tmp_path, capsys):
    write_voc2007(tmp_path / "VOCdevkit", broken="000002")
    code, err = run_voc(tmp_path / "VOCdevkit", tmp_path, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("python -m sim.run: error: "), err
    assert "000002.xml" in err[0] and "malformed XML" in err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "runs" / "bad").exists()  # the run folder starts only after the data loaded


def test_empty_voc_root_stops_with_one_line_naming_the_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_voc(tmp_path / "empty", tmp_path, capsys)
    assert code == 2
    assert len(err) == 1 and str(tmp_path / "empty") in err[0], err
    assert "no VOC2007/VOC2012 (JPEGImages + Annotations) found under" in err[0]
    assert not (tmp_path / "runs" / "bad").exists()
