"""experiments.chain_budget: the scaled schedule, the t interval and the paired summary."""

import json
import math

import pytest

from experiments.chain_budget import main, scaled_profile, summarise, t_interval
from models.ladder import get_profile


def test_scaled_profile_scales_the_chain_steps_only():
    cpu = get_profile("cpu")
    half = scaled_profile(cpu, 0.5)
    assert (half.budget.teacher_iters, half.budget.distill_iters) == (600, 450)
    assert half.budget.rd_iters == cpu.budget.rd_iters and half.budget.lr == cpu.budget.lr
    assert scaled_profile(cpu, 1e-9).budget.teacher_iters == 1  # never zero steps


def test_t_interval():
    result = t_interval([1.0, 3.0])  # mean 2, sd sqrt 2, n 2: half width 12.706 * sqrt(2) / sqrt(2)
    assert result["mean"] == 2.0 and result["ci95"] == pytest.approx([2.0 - 12.706, 2.0 + 12.706])
    assert all(math.isnan(v) for v in t_interval([5.0])["ci95"])


def _chain(folder, seed, fraction, teacher, tutor, edge):
    (folder / f"seed{seed}-f{fraction:g}.json").write_text(json.dumps({
        "seed": seed, "fraction": fraction, "threads": 2, "device": "cpu", "wall_s": 1.0,
        "steps": {"teacher": 1, "distill_a": 1, "distill_b": 1},
        "validation_map": {"teacher": teacher, "tutor": tutor, "edge": edge}}))


def test_summary_pairs_each_fraction_with_the_full_budget_of_its_seed(tmp_path):
    chains = tmp_path / "out" / "chains"
    chains.mkdir(parents=True)
    _chain(chains, 0, 1.0, 50.0, 40.0, 30.0)
    _chain(chains, 1, 1.0, 60.0, 44.0, 34.0)
    _chain(chains, 0, 0.5, 40.0, 38.0, 29.0)
    _chain(chains, 1, 0.5, 48.0, 42.0, 33.0)
    summary = summarise(tmp_path / "out", "cmd")
    half = summary["fractions"]["0.5"]
    assert half["teacher"]["minus_full"]["mean"] == pytest.approx(-11.0)  # -10 and -12
    assert half["edge"]["minus_full"]["mean"] == pytest.approx(-1.0)
    assert summary["fractions"]["1"]["teacher"]["mean"] == 55.0
    assert "minus_full" not in summary["fractions"]["1"]["teacher"]


def test_cli_needs_the_full_budget_among_the_fractions(capsys):
    with pytest.raises(SystemExit):
        main(["--fractions", "0.5", "--summarise-only"])
    assert "must include 1" in capsys.readouterr().err
