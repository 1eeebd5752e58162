"""experiments.variant: runs evaluated at other rounds compare at the evaluations they share."""

from __future__ import annotations

from experiments.variant import only_evaluations


def test_only_evaluations_hides_what_the_other_run_did_not_evaluate():
    record = {"round": 3, "ap_before": {"person": 0.5}, "ap_after": {"person": 0.4}, "after": {"tp.person": 3.0},
              "seconds": {"distill_c": 2.0}}
    assert only_evaluations(record, None) is record
    kept = only_evaluations(record, {(3, "ap_before"), (3, "ap_after")})
    assert kept["ap_before"] == {"person": 0.5} and kept["ap_after"] == {"person": 0.4}
    hidden = only_evaluations(record, {(3, "ap_before"), (4, "ap_after")})
    assert hidden["ap_before"] == {"person": 0.5} and hidden["ap_after"] == {} and hidden["after"] == {}
    assert hidden["seconds"] == {"distill_c": 2.0}  # costs stay: the round ran
    assert record["ap_after"] == {"person": 0.4}  # the record itself is not changed
