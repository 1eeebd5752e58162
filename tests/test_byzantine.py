"""The adversarial benchmark's attacks (bench.byzantine.altered_delta) against the pure verification gates."""

from __future__ import annotations

import json
import math

import torch

from bench.byzantine import ATTACKS, altered_delta
from models.ladder import build_model
from models.parts import delta_norm, neck_head
from strategies.verify import cosine_score, structural_check


def honest_delta():
    tutor = build_model("smoke", "tutor", seed=0)
    g = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(v.shape, generator=g) for k, v in neck_head(tutor).items()}
    scale = 0.05 * delta_norm(neck_head(tutor)) / delta_norm(delta)  # honest deltas are small next to the tutor
    return tutor, {k: scale * v for k, v in delta.items()}


def test_each_attack_alters_the_delta_as_named():
    tutor, delta = honest_delta()
    reference = neck_head(tutor)
    bound = delta_norm(reference)  # the default policy: the tutor's own neck/head norm
    out = {attack: altered_delta(delta, attack, seed=1) for attack in ATTACKS}
    # caught by structure: non-finite, wrong shape, a tensor that is not neck/head, too large
    for attack, reason in (("nan", "non-finite"), ("wrong_shape", "shape"), ("extra_backbone", "not the tutor's"),
                           ("scaled100", "exceeds the bound")):
        ok, why = structural_check(out[attack], reference, bound)
        assert not ok and reason in why, (attack, why)
    # well-formed ones pass structure; their harm is for the other gates to find
    for attack in ("sign_flip", "random", "absurd_weight"):
        assert structural_check(out[attack], reference, bound)[0], attack
    assert cosine_score(out["sign_flip"], delta) == -1.0 or math.isclose(cosine_score(out["sign_flip"], delta), -1.0)
    assert math.isclose(delta_norm(out["random"]), delta_norm(delta), rel_tol=1e-5)
    assert abs(cosine_score(out["random"], delta)) < 0.1
    assert out["eraser"]["head.classification_head.cls_logits.bias"][14] == -30.0  # person
    assert all(torch.equal(out["absurd_weight"][k], delta[k]) for k in delta)


def test_attack_families_take_a_strength_and_edit_only_their_rows():
    import argparse

    import pytest

    from bench.byzantine import BIAS, parse_attack
    from models.parts import CLASS_ROW_PARAMS
    from data.voc import CLASS_INDEX

    assert parse_attack("false_claim:2") == ("false_claim", 2.0) and parse_attack("score_shift") == ("score_shift", 3.0)
    assert parse_attack("nan")[0] == "nan" and math.isnan(parse_attack("nan")[1])
    for bad in ("nan:2", "false_claim:-1", "false_claim:x", "flood"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_attack(bad)
    _, delta = honest_delta()
    claim = altered_delta(delta, "false_claim:0.5", seed=1, claimed="car")
    hidden = altered_delta(delta, "hidden_edit:2", seed=1)
    changed = (claim[BIAS] != delta[BIAS]).nonzero().flatten().tolist()
    assert changed == [CLASS_INDEX["car"]] and claim[BIAS][CLASS_INDEX["car"]] == -0.5
    person = CLASS_INDEX["person"]
    assert (hidden[BIAS] != delta[BIAS]).nonzero().flatten().tolist() == [person]
    assert torch.isclose(hidden[BIAS][person], delta[BIAS][person] - 2.0)
    assert all(torch.equal(claim[k], delta[k]) for k in delta if k != BIAS)
    # tiny_claim: every claimed row (its own and the false claim's) at the strength times itself, the rest as sent
    tiny = altered_delta(delta, "tiny_claim:0.01", seed=1, claimed="car", own=("dog", "person"))
    rows = sorted(CLASS_INDEX[c] for c in ("car", "dog", "person"))
    for name in CLASS_ROW_PARAMS:
        scaled = (tiny[name] != delta[name]).flatten(1).any(1) if tiny[name].dim() > 1 else tiny[name] != delta[name]
        assert scaled.nonzero().flatten().tolist() == rows
        assert torch.allclose(tiny[name][rows], 0.01 * delta[name][rows])
    assert all(torch.equal(tiny[k], delta[k]) for k in delta if k not in CLASS_ROW_PARAMS)


def test_combined_attack_lowers_the_kept_and_protected_rows_and_claims():
    from bench.byzantine import BIAS, CLAIMING, SHIFTED_CLASSES
    from data.voc import CLASS_INDEX

    _, delta = honest_delta()
    out = altered_delta(delta, "combined:2", seed=1, claimed="car")
    lowered = sorted(CLASS_INDEX[c] for c in (*SHIFTED_CLASSES, "person"))
    changed = (out[BIAS] != delta[BIAS]).nonzero().flatten().tolist()
    assert changed == sorted([*lowered, CLASS_INDEX["car"]]) and "combined" in CLAIMING
    assert torch.allclose(out[BIAS][lowered], delta[BIAS][lowered] - 2.0)
    assert out[BIAS][CLASS_INDEX["car"]] == -2.0


def test_a_class_loss_within_its_noise_is_bounded_and_one_beyond_gets_through():
    from bench.byzantine import attack_verdict, class_tolerances

    tolerance = class_tolerances({"person": 0.01, "car": 0.02}, {"person": 0.03, "car": 0.05}, ("person",),
                                 protected_floor=0.05, z=3.0)
    assert tolerance["person"] == {"ap": 0.05, "recall": 3 * 0.03}  # the protected floor over 3 x 0.01
    assert math.isclose(tolerance["car"]["ap"], 0.06) and math.isclose(tolerance["car"]["recall"], 0.15)
    inside = {"person": {"ap": 0.04, "recall": 0.08}, "car": {"ap": 0.05, "recall": math.nan}}
    assert attack_verdict(False, inside, tolerance) == {"verdict": "bounded", "beyond_tolerance": []}
    # a shift that keeps car's AP but takes a fifth of its recall at the threshold is caught there
    shifted = {**inside, "car": {"ap": 0.0, "recall": 0.2}}
    assert attack_verdict(False, shifted, tolerance) == {"verdict": "gets through", "beyond_tolerance": ["car recall"]}
    assert attack_verdict(True, shifted, tolerance)["verdict"] == "kept out"


def test_the_recall_tolerance_counts_the_reference_operating_points_noise_and_the_strict_one_does_not():
    from bench.byzantine import judged, verdicts
    from strategies.verify import VerificationPolicy

    policy = VerificationPolicy(protected_classes=("person",), protected_tolerance=0.05, noise_z=3.0)
    table = {"sheep": {"loss": {"ap": 0.0, "recall": 0.15}, "noise": {"ap": 0.004, "recall": 0.04},
                       "reference": {"ap": "all honest", "recall": "hostile kept out"}},
             "cow": {"loss": {"ap": 0.0, "recall": 0.15}, "noise": {"ap": 0.004, "recall": 0.04},
                     "reference": {"ap": "before", "recall": "before"}}}
    choice = {"hostile kept out": {"sheep": {"std": 0.08}, "cow": {"std": 0.08}}, "all honest": {"sheep": {"std": 0.5}}}
    out = judged(table, choice, policy)
    # sheep's recall is judged against the kept-out tutor: its choice noise beside the paired noise
    assert math.isclose(out["sheep"]["tolerance"]["recall"], 3 * math.hypot(0.04, 0.08))
    assert math.isclose(out["sheep"]["strict_tolerance"]["recall"], 3 * 0.04)
    assert out["sheep"]["noise"]["operating_point"] == 0.08
    # against the tutor before the run (whose operating point the run did not choose): the paired noise alone
    assert out["cow"]["tolerance"] == out["cow"]["strict_tolerance"] and out["cow"]["noise"]["operating_point"] == 0.0
    assert verdicts(False, out) == {"verdict": "gets through", "beyond_tolerance": ["cow recall"],
                                    "strict_verdict": "gets through", "strict_beyond": ["cow recall", "sheep recall"]}


def test_an_attack_is_judged_against_the_lesser_of_its_legitimate_outcomes():
    from bench.byzantine import lesser_loss

    honest = {"car": {"loss": {"ap": 0.10, "recall": 0.02}, "noise": {"ap": 0.01, "recall": 0.01}}}
    kept_out = {"car": {"loss": {"ap": 0.03, "recall": 0.05}, "noise": {"ap": 0.02, "recall": 0.03}}}
    out = lesser_loss({"all honest": honest, "hostile kept out": kept_out})["car"]
    # AP: kept out would have cost car as much, so only 0.03 of it is the attack's; recall: against all honest
    assert out["loss"] == {"ap": 0.03, "recall": 0.02} and out["noise"] == {"ap": 0.02, "recall": 0.01}
    assert out["reference"] == {"ap": "hostile kept out", "recall": "all honest"}


def test_the_verdict_table_names_each_attacks_largest_loss_and_what_got_through():
    from bench.byzantine import verdict_table

    classes = {"car": {"loss": {"ap": 0.01, "recall": 0.143}, "tolerance": {"ap": 0.02, "recall": 0.105}},
               "dog": {"loss": {"ap": 0.03, "recall": math.nan}, "tolerance": {"ap": 0.05, "recall": math.nan}}}
    attack = {"verdict": "gets through", "beyond_tolerance": ["car recall"], "rejected": 0, "hostile": 2,
              "honest_accepted": 6, "honest": 6, "honest_gain_ratio": 0.98, "classes": classes}
    out = {"command": "python -m bench.byzantine", "all_honest": {"gain_of_the_honest_clients": 29.0},
           "hostile_kept_out": {"honest_gain_ratio": 1.01}, "hostile_only_classes": ["cat"],
           "attacks": {"combined:3": attack}}
    row = verdict_table(out).splitlines()[-1]
    assert row == ("| combined:3 | gets through (car recall) | 0/2 | 6/6 | 0.98 | dog 3.0 / 5.0 | "
                   "car 14.3 / 10.5 | - |")  # judged before the strict verdict was kept beside
    out["attacks"]["combined:3"] = {**attack, "strict_verdict": "gets through", "strict_beyond": ["car recall"]}
    assert verdict_table(out).splitlines()[-1].endswith("| car 14.3 / 10.5 | gets through (car recall) |")
    # a run that counted deltas too: rejected in round 1 only, both clients count as not kept out
    out["attacks"]["combined:3"] = {**attack, "hostile_deltas": 4, "hostile_deltas_rejected": 2}
    row = verdict_table(out).splitlines()[-1]
    assert row.startswith("| combined:3 | gets through (car recall) | 0/2 / 2/4 | 6/6 |")
    # and honest deltas: a client accepted in round 1 and rejected in round 2 still counts among the 6 clients
    rejected = [{"client": 0, "round": 2, "reason": "direction: cosine 0.000 with the reference < 0.007"}]
    out["attacks"]["combined:3"] = {**attack, "honest_deltas": 12, "honest_deltas_rejected": rejected}
    out["hostile_kept_out"] = {"honest_gain_ratio": 1.01, "honest_deltas": 12, "honest_deltas_rejected": rejected}
    table = verdict_table(out)
    assert table.splitlines()[-1].startswith("| combined:3 | gets through (car recall) | 0/2 | 6/6 / 11/12 |")
    assert ("honest deltas rejected: all honest ?, hostile kept out client 0 round 2 (direction: cosine 0.000 "
            "with the reference < 0.007)") in table


def test_a_recall_that_got_through_is_shown_beside_its_classs_f1_move():
    from bench.byzantine import verdict_table

    classes = {"car": {"loss": {"ap": 0.01, "recall": 0.143}, "tolerance": {"ap": 0.02, "recall": 0.105},
                       "reference": {"ap": "all honest", "recall": "hostile kept out"}},
               "cat": {"loss": {"ap": 0.09, "recall": 0.2}, "tolerance": {"ap": 0.02, "recall": 0.105},
                       "reference": {"ap": "before", "recall": "before"}}}
    attack = {"verdict": "gets through", "beyond_tolerance": ["car recall", "cat ap", "cat recall"], "rejected": 0,
              "hostile": 2, "honest_accepted": 6, "honest": 6, "honest_gain_ratio": 0.98, "classes": classes,
              "tutor": {"f1_before": {"car": 0.1, "cat": 0.3}, "f1_after": {"car": 0.45, "cat": 0.1}}}
    out = {"command": "python -m bench.byzantine", "all_honest": {"gain_of_the_honest_clients": 29.0,
                                                                  "tutor": {"f1_after": {"car": 0.40}}},
           "hostile_kept_out": {"honest_gain_ratio": 1.01, "tutor": {"f1_after": {"car": 0.44}}},
           "hostile_only_classes": ["cat"], "attacks": {"tiny_claim": attack}}
    row = verdict_table(out).splitlines()[-1]
    # car's recall was judged against the kept-out tutor (F1 0.44 there, 0.45 here: up 1 point); cat's against
    # the tutor before the run (0.3 -> 0.1: down 20); an AP loss carries no F1
    assert row.startswith("| tiny_claim | gets through (car recall, F1 +1.0; cat ap; cat recall, F1 -20.0) |")


def test_bad_arguments_stop_the_benchmark_before_any_run(capsys):
    import pytest

    from bench.byzantine import hostile_problem, main

    assert hostile_problem([2, 5], 8) == ""
    assert "from 0 to 7" in hostile_problem([2, 8], 8) and "twice" in hostile_problem([2, 2], 8)
    assert "all 2 clients" in hostile_problem([0, 1], 2)
    for argv, said in ((["--hostile", "9"], "from 0 to 7"), (["--timeout", "0"], "--timeout"),
                       (["--scenario", "no-such-scenario"], "scenario"), (["--attacks", "flood"], "unknown attack")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err, argv


def test_a_bench_file_is_resumed_only_with_its_own_settings_and_reference_runs(tmp_path, capsys):
    import math

    import pytest

    from bench.byzantine import as_json, main, references_problem, resume_problem
    from protocol.config import RunConfig

    config = RunConfig().to_dict()
    tutor = {"ap_after": {"cat": 0.25, "dog": math.nan}, "recall_after": {"cat": 0.5}}
    earlier = json.loads(as_json({"config": config, "hostile_clients": [0, 1], "attacks": {"eraser": {}},
                                  "all_honest": {"tutor": tutor}, "hostile_kept_out": {"tutor": tutor}}))
    assert resume_problem(earlier, config, [0, 1]) == ""  # a file read back from JSON (NaN, lists) matches
    assert resume_problem(earlier, {**config, "cache_dir": "/elsewhere/.cache"}, [0, 1]) == ""  # changes no figure
    assert "hostile clients [0, 1], not [2, 5]" in resume_problem(earlier, config, [2, 5])
    assert "(clip_share)" in resume_problem(earlier, {**config, "clip_share": "whole"}, [0, 1])
    assert "not a bench file" in resume_problem({"config": config}, config, [0, 1])
    now = {"all_honest": {"tutor": tutor}, "hostile_kept_out": {"tutor": tutor}}
    assert references_problem(earlier, now) == ""
    other = {**now, "hostile_kept_out": {"tutor": {**tutor, "recall_after": {"cat": 0.4}}}}
    assert "another hostile kept out tutor" in references_problem(earlier, other)
    # a file made with other settings stops the bench before any run, in one line
    out = tmp_path / "bench.json"
    out.write_text(as_json(earlier))
    with pytest.raises(SystemExit) as stop:
        main(["--resume", "--out", str(out), "--clip-share", "whole"])
    said = capsys.readouterr().err
    assert stop.value.code == 2 and "other settings (" in said and "clip_share" in said


def test_data_poisoning_drops_or_relabels_a_share_of_the_named_classes_objects_the_same_way_each_time():
    import argparse

    import pytest

    from bench.byzantine import parse_attack, poisoned_target
    from data.voc import CLASS_INDEX

    person, bus, cat, car = (CLASS_INDEX[c] for c in ("person", "bus", "cat", "car"))
    labels = torch.tensor([person, bus, cat] * 40)
    target = {"boxes": torch.arange(480.0).reshape(120, 4), "labels": labels,
              "difficult": torch.zeros(120, dtype=torch.bool), "image_id": "img-1"}
    kept, private = ("bus", "person"), ("cat",)
    dropped = poisoned_target(target, "label_drop", kept, private, "car", seed=3)
    assert dropped["labels"].tolist() == [cat] * 40 and dropped["boxes"][:, 0].tolist() == list(range(8, 480, 12))
    assert len(dropped["difficult"]) == 40 and dropped["image_id"] == "img-1"
    half = poisoned_target(target, "label_drop:0.5", kept, private, "car", seed=3)
    assert 20 < len(half["labels"]) - 40 < 60 and (half["labels"] == cat).sum() == 40  # about half of the 80 kept
    assert torch.equal(half["boxes"], poisoned_target(target, "label_drop:0.5", kept, private, "car", seed=3)["boxes"])
    assert not torch.equal(half["boxes"], poisoned_target(target, "label_drop:0.5", kept, private, "car",
                                                           seed=4)["boxes"])
    flipped = poisoned_target(target, "label_flip", kept, private, "car", seed=3)
    assert flipped["labels"].tolist() == [person, bus, car] * 40 and torch.equal(flipped["boxes"], target["boxes"])
    assert target["labels"].tolist() == [person, bus, cat] * 40  # the image's own target untouched
    with pytest.raises(argparse.ArgumentTypeError, match="at most 1"):
        parse_attack("label_drop:2")


def test_a_poisoning_client_trains_on_its_poisoned_shard_and_the_shard_is_honest_again_after(smoke_cache,
                                                                                            monkeypatch):
    """The hostile handler swaps the client's training shard in ``clients.app``'s per-process cache while the
    honest handler trains, and takes it out after."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import clients.app as honest
    from bench.byzantine import poisoned_training
    from data.voc import CLASS_INDEX
    from protocol.config import resolve_run_config
    from protocol.wire import CONFIG, SERVER_ROUND

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # a message outside a Flower run
        monkeypatch.setattr(TaskIdentity, name, value)
    run = resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 1, "cache-dir": str(smoke_cache)})
    msg = Message(content=RecordDict({CONFIG: ConfigRecord({**run.to_record(), SERVER_ROUND: 1})}),
                  message_type="train", dst_node_id=1)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    threads = torch.get_num_threads()
    _, _, ws, partition, _ = honest._common(msg, context)
    kept = {CLASS_INDEX[c] for c in ws.clients[partition].kept}

    def labels_of(data):
        return {int(label) for i in range(len(data)) for label in data[i][1]["labels"]}

    try:
        with poisoned_training(msg, context, "label_drop", ""):
            poisoned = labels_of(honest._dataset(ws, partition, "train"))
        honest_again = labels_of(honest._dataset(ws, partition, "train"))
    finally:
        torch.set_num_threads(threads)
    assert poisoned and not poisoned & kept
    assert kept & honest_again and poisoned < honest_again
