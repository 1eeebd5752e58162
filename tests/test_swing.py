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
    # two iid N(0, s^2) points: E[max(x0 - x1, 0)] = s * sqrt(2) / sqrt(2 pi) = s / sqrt(pi); the moves of
    # (0, 2, 0) have sd 2, so s = 2 / sqrt 2 and three points forget more than two
    rng = np.random.default_rng(0)
    two = forgetting_without_drift([0.0, 2.0, 4.0, 6.0][:2], 20000, rng)
    assert two == 0.0  # one move has no spread: a straight path forgets nothing
    three = forgetting_without_drift([0.0, 2.0, 0.0], 20000, rng)
    sd = 2 / np.sqrt(2)
    assert three > sd / np.sqrt(np.pi)  # more earlier points, a higher best earlier value
    assert forgetting_without_drift([40.0] * 5, 10, rng) == 0.0  # no move, nothing forgotten
    wide = forgetting_without_drift([0.0, 4.0, 0.0], 20000, np.random.default_rng(1))
    assert wide == pytest.approx(2 * forgetting_without_drift([0.0, 2.0, 0.0], 20000, np.random.default_rng(1)))


def test_spread_per_class_takes_each_client_s_other_clients_classes_only():
    from experiments.spread_ceiling import client_class_spread

    specs = [{"client": 0, "private": ["car"]}, {"client": 1, "private": ["dog"]}]
    start = {"car": 0.0, "dog": 0.1}
    records = [
        {"method": "diredi", "client": 0, "round": 1, "ap_before": start, "ap_after": {"car": 0.5, "dog": 0.2}},
        {"method": "diredi", "client": 0, "round": 2, "ap_before": {}, "ap_after": {"car": 0.6, "dog": 0.4}},
        {"method": "diredi", "client": 1, "round": 1, "ap_before": start, "ap_after": {"car": 0.1, "dog": 0.5}},
        {"method": "diredi", "client": 1, "round": 2, "ap_before": {}, "ap_after": {"car": 0.3, "dog": 0.7}},
        {"method": "oracle", "client": 1, "round": 2, "ap_before": start, "ap_after": {"car": 0.9, "dog": 0.9}},
    ]
    spread = client_class_spread(records, specs, "diredi", 2)
    assert spread == {"dog": [pytest.approx(30.0)], "car": [pytest.approx(30.0)]}  # client 0 on dog, 1 on car
    assert client_class_spread(records, specs, "diredi", 3) == {}
