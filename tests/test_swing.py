"""experiments.swing: the protected class's moves per round, on hand-made records."""

import pytest

from experiments.swing import protected_moves


def record(client: int, server_round: int, before: float, after: float, method: str = "diredi") -> dict:
    return {"method": method, "client": client, "round": server_round,
            "ap_before": {"person": before}, "ap_after": {"person": after, "car": 0.5}}


def test_moves_start_from_the_first_edge_and_follow_each_client_round_by_round():
    specs = [{"client": 0, "protected": ["person"]}, {"client": 1, "protected": ["person"]}]
    records = [record(0, 1, 0.60, 0.50), record(0, 2, 0.50, 0.55), record(1, 2, 0.70, 0.72),
               record(1, 1, 0.70, 0.70), record(1, 1, 0.0, 0.0, method="local")]
    moves = protected_moves(records, specs, "diredi")
    assert moves[1][0] == [pytest.approx(-10.0)] and moves[2][0] == [pytest.approx(5.0)]
    assert moves[1][1] == [pytest.approx(0.0)] and moves[2][1] == [pytest.approx(2.0)]  # from round 1's after
    assert protected_moves(records, specs, "fedavg") == {}


def test_forgetting_without_drift_is_what_the_same_values_give_in_any_order():
    import numpy as np

    from experiments.swing import forgetting_without_drift, last_forgetting, protected_paths

    specs = [{"client": 0, "protected": ["person"]}]
    records = [record(0, 2, 0.50, 0.55), record(0, 1, 0.60, 0.50)]
    assert protected_paths(records, specs, "diredi") == [pytest.approx([60.0, 50.0, 55.0])]
    assert last_forgetting(np.array([60.0, 50.0, 55.0])) == pytest.approx(5.0)  # best earlier 60, last 55
    assert last_forgetting(np.array([50.0, 60.0])) == 0.0  # better now: nothing forgotten
    # orders of (60, 50, 55) with equal chance: the last is 60 (0), 50 (10) or 55 (5): mean 5
    assert forgetting_without_drift([60.0, 50.0, 55.0], 4000, np.random.default_rng(0)) == pytest.approx(5.0, abs=0.3)
    assert forgetting_without_drift([40.0] * 5, 10, np.random.default_rng(0)) == 0.0  # no move, nothing forgotten
