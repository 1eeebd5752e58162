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
