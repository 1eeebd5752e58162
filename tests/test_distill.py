"""The trainer (direct / KD / RD), the cached manufacturer chain and one client's RD pipeline."""

import copy
import logging

import pytest
import torch
from torch.utils.data import Subset

from distill.rd import (ClientTraining, client_delta, distill_c, reverse_distill_tutor1, reverse_distill_tutor2,
                        updated_tutor)
from clients.store import open_body_cache, save_body_memo, save_body_outputs, take_body_memo
from distill.body_memo import BodyMemo, image_keys
from distill.chain import cached_stage
from distill.trainer import Phase, train
from models.ladder import build_model, detection_losses, get_profile, neck_features
from models.parts import neck_head, split_parameters
from session.workspace import prepare


@pytest.fixture(scope="module")
def ws(smoke_cache):
    return prepare("smoke", "default8", num_clients=2, seed=0, cache_dir=smoke_cache)


def batch_loss(model, dataset, n=8):
    images, targets = zip(*[dataset[i] for i in range(n)])
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    model.train()
    with torch.no_grad():
        image_list, targets = model.transform(list(images), targets)
        losses = detection_losses(model, image_list, targets, neck_features(model, image_list.tensors))
    return float(sum(losses.values()))


def test_trainer_lowers_the_loss_on_a_smoke_batch(ws):
    data = Subset(ws.chain_data().teacher_train, range(8))
    model = build_model("smoke", "edge", seed=0)
    before = batch_loss(model, data)
    report = train(model, data, Phase("direct", iters=30, batch_size=8, lr=2e-3, optimizer="adamw",
                                      hflip=False), progress=False)
    after = batch_loss(model, data)
    assert after < 0.8 * before, (before, after)
    assert report.iters == 30 and report.seconds > 0 and report.peak_rss_mb > 0
    assert 0 < report.cpu_seconds < 10 * report.seconds  # the process's CPU over the phase (all its threads)


def test_rd_step_trains_only_unfrozen_parts_and_teacher_is_untouched(ws):
    data = ws.chain_data().presumed_train
    tutor, edge = build_model("smoke", "tutor", seed=1), build_model("smoke", "edge", seed=2)
    tutor_before = {n: p.detach().clone() for n, p in tutor.named_parameters()}
    edge_before = {n: p.detach().clone() for n, p in edge.state_dict().items()}
    train(tutor, data, Phase("rd", iters=3, batch_size=4, label_weight=0.1, freeze=("backbone",)),
          teacher=edge, progress=False)
    parts = split_parameters(tutor)
    assert all(torch.equal(p, tutor_before[n]) for n, p in parts["backbone"].items())
    assert any(not torch.equal(p, tutor_before[n]) for n, p in parts["neck"].items())
    assert all(torch.equal(v, edge_before[n]) for n, v in edge.state_dict().items())
    # BatchNorm statistics of a frozen backbone do not drift either.
    assert all(torch.equal(b, dict(build_model("smoke", "tutor", seed=1).named_buffers())[n])
               for n, b in tutor.named_buffers() if "running" in n)


def test_phase_errors_are_clear(ws):
    data = ws.chain_data().presumed_train
    model = build_model("smoke", "edge")
    with pytest.raises(ValueError, match="needs a teacher"):
        train(model, data, Phase("x", iters=1, batch_size=2, targets="teacher"), progress=False)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train(model, data, Phase("x", iters=1, batch_size=2, optimizer="lbfgs"), progress=False)
    with pytest.raises(ValueError, match="cannot freeze unknown parts"):
        train(model, data, Phase("x", iters=1, batch_size=2, freeze=("body",)), progress=False)


def test_stage_cache_reused_rebuilt_on_change_and_on_corruption(tmp_path, ws, caplog):
    data = Subset(ws.chain_data().presumed_train, range(8))
    fits = []

    def fit(model, iters=2):
        fits.append(iters)
        return train(model, data, Phase("p", iters=iters, batch_size=4), progress=False)

    build = lambda: build_model("smoke", "edge", seed=0)  # noqa: E731
    first = cached_stage(tmp_path, "edge", {"iters": 2}, build, fit)
    again = cached_stage(tmp_path, "edge", {"iters": 2}, build, fit)
    assert not first.reused and again.reused and len(fits) == 1
    for (n, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n
    changed = cached_stage(tmp_path, "edge", {"iters": 3}, build, lambda m: fit(m, 3))
    assert not changed.reused and changed.key != first.key and len(fits) == 2
    first.path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        rebuilt = cached_stage(tmp_path, "edge", {"iters": 2}, build, fit)
    assert not rebuilt.reused and len(fits) == 3
    assert "checksum" in caplog.text and "rebuilding" in caplog.text


def test_chain_second_call_reuses_every_stage(ws):
    first = ws.chain(progress=False)
    second = ws.chain(progress=False)
    assert all(s.reused for s in second.stages.values())
    for a, b in [(first.edge, second.edge), (first.tutor, second.tutor)]:
        for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), n


def test_client_rd_pipeline_on_smoke(ws):
    chain = ws.chain(progress=False)
    settings = ClientTraining.from_profile(get_profile("smoke"))
    t1, _ = reverse_distill_tutor1(chain.tutor, chain.edge, ws.client_presumed(0), settings, seed=0)
    t2, _ = reverse_distill_tutor2(chain.tutor, t1, chain.edge, ws.client_train(0), settings, seed=0)
    delta = client_delta(t1, t2, settings)
    assert set(delta) == set(neck_head(chain.tutor))  # neck and head only: the backbone never leaves
    new = updated_tutor(chain.tutor, delta, settings.beta)
    old_parts, new_parts = split_parameters(chain.tutor), split_parameters(new)
    assert all(torch.equal(new_parts["backbone"][n], p) for n, p in old_parts["backbone"].items())
    for name, value in neck_head(new).items():  # eq. (10) with beta = 1: tutor + T2 - T1
        expected = neck_head(chain.tutor)[name] + neck_head(t2)[name] - neck_head(t1)[name]
        torch.testing.assert_close(value, expected)
    edge_c, report = distill_c(chain.edge, new, ws.client_train(0), settings, seed=0)
    assert report.iters == settings.redistill_iters
    assert any(not torch.equal(a, b) for a, b in zip(edge_c.parameters(), chain.edge.parameters()))


def test_teacher_detections_are_the_detectors_own_detections_above_the_threshold(ws):
    """Pseudo labels (Distill C with redistill_targets="teacher") = what the teacher's eval-mode
    forward detects, in the transformed images' coordinates, cut at the score threshold."""
    from distill.trainer import teacher_detections

    teacher = build_model("smoke", "teacher", seed=0).eval()
    teacher.score_thresh = 0.0  # an untrained head scores ~0.08 at most: keep every box so there is content
    reg = teacher.head.regression_head.bbox_reg  # untrained boxes are degenerate: make each one anchor-sized
    torch.nn.init.zeros_(reg.weight)
    torch.nn.init.ones_(reg.bias)
    images = [ws.client_test(0)[i][0] for i in range(3)]
    with torch.no_grad():
        expected = teacher(images)  # eval mode: postprocess + transform back (identity: images are image_size)
        image_list, _ = teacher.transform(images)
        got = teacher_detections(teacher, image_list, score_thresh=0.0)
    assert all(len(d["boxes"]) > 0 for d in got)
    side = ws.profile.image_size
    for exp, det in zip(expected, got):
        valid = (exp["boxes"][:, 2] > exp["boxes"][:, 0] + 1) & (exp["boxes"][:, 3] > exp["boxes"][:, 1] + 1)
        assert torch.allclose(det["boxes"], exp["boxes"][valid], atol=1e-4)
        assert torch.equal(det["labels"], exp["labels"][valid])
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= side).all()
    # The threshold keeps exactly the boxes scoring at least it.
    cut = float(expected[0]["scores"].median())
    with torch.no_grad():
        kept = teacher_detections(teacher, image_list, score_thresh=cut)[0]
    above = (expected[0]["scores"] >= cut) & (expected[0]["boxes"][:, 2] > expected[0]["boxes"][:, 0] + 1) & \
        (expected[0]["boxes"][:, 3] > expected[0]["boxes"][:, 1] + 1)
    assert 0 < len(kept["boxes"]) < len(got[0]["boxes"])
    assert torch.allclose(kept["boxes"], expected[0]["boxes"][above], atol=1e-4)


def test_freeze_norm_keeps_batchnorm_statistics_and_leaves_cache_keys_alone(ws):
    def running_means(model):
        return {n: b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")}

    data = Subset(ws.client_train(0), range(8))
    for freeze in (False, True):
        model = build_model("smoke", "edge", seed=0)
        before = running_means(model)
        train(model, data, Phase("t", iters=2, batch_size=4, lr=1e-3, optimizer="adamw", freeze_norm=freeze),
              progress=False)
        after = running_means(model)
        unchanged = all(torch.equal(before[n], after[n]) for n in before)
        assert unchanged == freeze and before  # kept only with freeze_norm (and there are BatchNorm layers)
    # a phase at the default has the keys it had before the option existed (the chain's cache keys)
    assert "freeze_norm" not in Phase("t", iters=1, batch_size=1).to_dict()
    assert Phase("t", iters=1, batch_size=1, freeze_norm=True).to_dict()["freeze_norm"] is True


def test_body_memo_serves_distill_c_tutor_2s_batches_with_the_same_results(ws, tmp_path):
    chain = ws.chain(progress=False)
    settings = ClientTraining.from_profile(get_profile("smoke"))
    data = ws.client_train(0)
    t1, _ = reverse_distill_tutor1(chain.tutor, chain.edge, ws.client_presumed(0), settings, seed=0)
    memo = BodyMemo.for_model(t1)
    t2, _ = reverse_distill_tutor2(chain.tutor, t1, chain.edge, data, settings, seed=0, body_memo=memo)
    plain_t2, _ = reverse_distill_tutor2(chain.tutor, t1, chain.edge, data, settings, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(t2.state_dict().values(), plain_t2.state_dict().values()))
    assert 0 < len(memo.outputs) <= settings.rd_iters * settings.batch_size  # one entry per image and flip
    # Between the client's two messages the memo waits on its disk.
    save_body_memo(tmp_path, "diredi", 0, memo)
    kept = take_body_memo(tmp_path, "diredi", 0)
    assert take_body_memo(tmp_path, "diredi", 0) is None  # taken: the file is gone
    assert kept.body_key == memo.body_key and not kept.recording
    new = updated_tutor(chain.tutor, client_delta(t1, t2, settings), settings.beta)  # same body, new neck/head
    edge_memo, _ = distill_c(chain.edge, new, data, settings, seed=0, body_memo=kept)
    edge_plain, _ = distill_c(chain.edge, new, data, settings, seed=0)
    assert kept.hits >= min(settings.rd_iters, settings.redistill_iters)  # Distill C starts with Tutor 2's batches
    assert all(torch.equal(a, b) for a, b in zip(edge_memo.state_dict().values(), edge_plain.state_dict().values()))
    assert len(kept.outputs) == len(memo.outputs)  # reading only: Distill C's own images are not kept


def test_body_memo_refuses_another_body_and_notices_in_place_writes(ws):
    chain = ws.chain(progress=False)
    settings = ClientTraining.from_profile(get_profile("smoke"))
    data, tutor = ws.client_train(0), copy.deepcopy(chain.tutor)
    memo = BodyMemo.for_model(tutor)
    reverse_distill_tutor2(tutor, tutor, chain.edge, data, settings, seed=0, body_memo=memo)
    memo.recording = False
    assert memo.serves(tutor) and not memo.serves(chain.teacher)
    with torch.no_grad():
        next(tutor.backbone.body.parameters()).add_(1e-3)  # the same tensor objects, written in place
    assert not memo.serves(tutor)
    edge_memo, _ = distill_c(chain.edge, tutor, data, settings, seed=0, body_memo=memo)
    edge_plain, _ = distill_c(chain.edge, tutor, data, settings, seed=0)
    assert memo.hits == 0  # its batches are Distill C's, but they came from the body before the write
    assert all(torch.equal(a, b) for a, b in zip(edge_memo.state_dict().values(), edge_plain.state_dict().values()))


@pytest.mark.parametrize("threads", [1, 2])
def test_an_images_body_outputs_do_not_depend_on_its_batch_of_two_or_more(ws, threads):
    """What the per-image memo's exactness rests on (distill.body_memo): within a batch of 2..8 an
    image's body outputs are the same bits whatever the other images and the batch size; a batch of one
    may differ, so the memo never serves or records one."""
    tutor = ws.chain(progress=False).tutor.eval()
    data = ws.client_train(0)
    x = tutor.transform([data[i][0] for i in range(10)], None)[0].tensors
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            whole = tutor.backbone.body(x[:8])
            for rows in ([2, 5], [7, 0, 3], [1, 2, 3, 4, 5, 6], [8, 9, 0, 1, 2, 3, 4, 5]):
                part = tutor.backbone.body(x[rows])
                for j, i in enumerate(rows):
                    if i < 8:
                        assert all(torch.equal(part[k][j], whole[k][i]) for k in whole), (rows, i)
            memo = BodyMemo.for_model(tutor)
            single = memo.body_outputs(tutor, x[:1])
        assert not memo.outputs and all(torch.equal(single[k], tutor.backbone.body(x[:1])[k]) for k in single)
    finally:
        torch.set_num_threads(previous)


def test_a_batch_partly_in_the_memo_gets_the_bits_of_the_whole_batch(ws):
    tutor = ws.chain(progress=False).tutor.eval()
    data = ws.client_train(0)
    x = tutor.transform([data[i][0] for i in range(8)], None)[0].tensors
    memo = BodyMemo.for_model(tutor)
    with torch.no_grad():
        whole = tutor.backbone.body(x)
    for seen in ([0, 1, 2], [3, 4, 5, 6]):
        memo.body_outputs(tutor, x[seen])
    served = memo.body_outputs(tutor, x)  # image 7, the one missing, runs with a neighbour
    assert memo.images_served == 7 and set(memo.outputs) == set(image_keys(x))
    assert all(torch.equal(served[k], whole[k]) for k in whole)
    memo.body_outputs(tutor, x)
    assert memo.hits == 1  # the second time the whole batch is found


def test_a_run_long_body_cache_serves_later_rounds_and_changes_no_weight(ws, tmp_path):
    """body_cache "run": each phase adds its images' body outputs to the client's disk and later rounds
    find them there; the tutors and the edge are the same bits as without it."""
    chain = ws.chain(progress=False)
    settings = ClientTraining.from_profile(get_profile("smoke"))
    presumed, data, key = ws.client_presumed(0), ws.client_train(0), BodyMemo.for_model(chain.tutor).body_key
    served = []
    for seed in (0, 1):  # two rounds: each round's own seeds
        results = []
        for memo_of in (lambda: open_body_cache(tmp_path, "diredi", 0, key), lambda: None):
            memo = memo_of()
            t1, _ = reverse_distill_tutor1(chain.tutor, chain.edge, presumed, settings, seed, body_memo=memo)
            t2, _ = reverse_distill_tutor2(chain.tutor, t1, chain.edge, data, settings, seed, body_memo=memo)
            if memo is not None:
                save_body_outputs(tmp_path, "diredi", 0, memo)
                served.append(memo.images_served)
                memo = open_body_cache(tmp_path, "diredi", 0, key)  # the client's next message
            new = updated_tutor(chain.tutor, client_delta(t1, t2, settings), settings.beta)
            edge, _ = distill_c(chain.edge, new, data, settings, seed, body_memo=memo)
            if memo is not None:
                save_body_outputs(tmp_path, "diredi", 0, memo)
                served[-1] += memo.images_served
            results.append([t1, t2, edge])
        for with_cache, without in zip(*results):
            assert all(torch.equal(a, b) for a, b in zip(with_cache.state_dict().values(),
                                                         without.state_dict().values()))
    drawn = settings.batch_size * (2 * settings.rd_iters + settings.redistill_iters)
    assert 0 < served[0] < served[1] <= drawn  # round 2 finds round 1's images
    folder = tmp_path / "diredi" / "client-0" / "body-cache"
    files = sorted(folder.iterdir())
    assert len(files) >= 2
    open_body_cache(tmp_path, "diredi", 0, "another body")  # the tutor's body changed: stale files go
    assert not any(folder.iterdir())


def test_class_score_distillation_is_zero_at_the_teacher_and_pulls_only_the_chosen_classes():
    from distill.scores import class_score_distillation

    torch.manual_seed(0)
    teacher = torch.randn(2, 30, 5)
    classes = torch.tensor([1, 3])
    assert float(class_score_distillation(teacher, teacher, classes)) == pytest.approx(0.0, abs=1e-5)
    student = torch.randn(2, 30, 5, requires_grad=True)
    loss = class_score_distillation(student, teacher, classes)
    loss.backward()
    assert float(loss) > 0
    assert student.grad[..., [0, 2, 4]].abs().sum() == 0 and student.grad[..., [1, 3]].abs().sum() > 0
    # the gradient moves each chosen score toward the teacher's
    moved = torch.sigmoid(student - 0.5 * student.grad)[..., classes] - torch.sigmoid(teacher)[..., classes]
    assert moved.abs().sum() < (torch.sigmoid(student) - torch.sigmoid(teacher))[..., classes].abs().sum()


def score_gap(model, tutor, data, classes, n=8) -> float:
    """The binary KL of ``model``'s class scores from ``tutor``'s on ``classes`` over ``data``'s first images."""
    from distill.scores import class_score_distillation

    images = [data[i][0] for i in range(n)]
    with torch.no_grad():
        x = model.transform(images, None)[0].tensors
        s = model.head(neck_features(model, x))["cls_logits"]
        t = tutor.head(neck_features(tutor, x))["cls_logits"]
    return float(class_score_distillation(s, t, torch.tensor(classes)))


def test_distill_c_with_score_targets_keeps_the_tutors_scores_closer(ws):
    """Distill C with the tutor's class scores on the kept classes as soft targets ends nearer the
    tutor's scores on them than without; off by default (the same edge as before the option)."""
    from dataclasses import replace

    from data.voc import CLASS_INDEX

    chain = ws.chain(progress=False)
    settings = ClientTraining.from_profile(get_profile("smoke"))
    data, spec = ws.client_train(0), ws.clients[0]
    kept = tuple(CLASS_INDEX[c] for c in spec.kept)
    plain, _ = distill_c(chain.edge, chain.tutor, data, settings, seed=0)
    off, _ = distill_c(chain.edge, chain.tutor, data, settings, seed=0, kept_classes=kept)  # weight 0: off
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values()))
    scored, report = distill_c(chain.edge, chain.tutor, data, replace(settings, redistill_score_weight=4.0), seed=0,
                               kept_classes=kept)
    assert len(report.score_losses) == settings.redistill_iters
    assert score_gap(scored, chain.tutor, data, kept) < score_gap(plain, chain.tutor, data, kept)


def test_spread_distill_brings_the_edge_to_the_tutors_scores_and_leaves_its_start(ws):
    """Spread's server-side distillation: the tutor's outputs are the only targets (labels unused), its
    class scores on every class are learnt (the edge ends nearer them than it started), the server's
    edge it starts from is not changed, and the same seed gives the same edge."""
    from data.voc import CLASS_INDEX
    from distill.rd import spread_distill

    chain = ws.chain(progress=False)
    settings = ClientTraining.from_profile(get_profile("smoke"))
    images = ws.chain_data().teacher_train
    classes = tuple(CLASS_INDEX[c] for c in ws.scenario.teacher_classes)
    before = {k: v.clone() for k, v in chain.edge.state_dict().items()}
    spread, report = spread_distill(chain.edge, chain.tutor, images, settings, seed=0, classes=classes)
    assert all(torch.equal(v, chain.edge.state_dict()[k]) for k, v in before.items())
    assert len(report.score_losses) == settings.redistill_iters
    again, _ = spread_distill(chain.edge, chain.tutor, images, settings, seed=0, classes=classes)
    assert all(torch.equal(a, b) for a, b in zip(spread.state_dict().values(), again.state_dict().values()))
    _, longer = spread_distill(chain.edge, chain.tutor, images, settings, seed=0, classes=classes,
                               iters=settings.redistill_iters + 3)  # --spread-iters
    assert len(longer.score_losses) == settings.redistill_iters + 3

    assert score_gap(spread.eval(), chain.tutor, images, classes, 16) < score_gap(chain.edge.eval(), chain.tutor,
                                                                                   images, classes, 16)



def test_the_servers_spread_memo_serves_the_next_round_with_the_same_results(ws):
    """With ``body_cache="run"`` the server keeps the tutor body's outputs on the spread images across
    rounds: a round whose tutor has a new neck/head (eq. 10 leaves the body) is served from what an
    earlier round computed, and its edge is the one computed without the memo."""
    from data.voc import CLASS_INDEX
    from distill.rd import spread_distill

    chain = ws.chain(progress=False)
    settings = ClientTraining.from_profile(get_profile("smoke"))
    images = ws.chain_data().teacher_train
    classes = tuple(CLASS_INDEX[c] for c in ws.scenario.teacher_classes)
    memo = BodyMemo.for_model(chain.tutor)
    first, _ = spread_distill(chain.edge, chain.tutor, images, settings, seed=0, classes=classes, body_memo=memo)
    assert memo.images_served == 0 and len(memo.outputs) > 0
    t1, _ = reverse_distill_tutor1(chain.tutor, chain.edge, ws.client_presumed(0), settings, seed=0)
    new = updated_tutor(chain.tutor, client_delta(chain.tutor, t1, settings), settings.beta)  # the next round's
    served, _ = spread_distill(first, new, images, settings, seed=0, classes=classes, body_memo=memo)
    plain, _ = spread_distill(first, new, images, settings, seed=0, classes=classes)
    assert memo.images_served > 0  # the same seed draws the same images: the body ran on none of them again
    assert all(torch.equal(a, b) for a, b in zip(served.state_dict().values(), plain.state_dict().values()))

def test_redistill_lr_sets_distill_c_alone():
    from dataclasses import replace

    from distill.rd import distill_c_phase
    from protocol.config import RunConfig

    settings = ClientTraining.from_profile(get_profile("cpu"))
    assert distill_c_phase(settings, 0).lr == settings.lr == 2e-3  # 0: the profile's lr
    faster = replace(settings, redistill_lr=4e-3)
    assert distill_c_phase(faster, 0).lr == 4e-3
    assert RunConfig(profile="cpu", redistill_lr=4e-3).client_training().redistill_lr == 4e-3
    assert RunConfig().client_training().redistill_lr == 3e-3  # the run's default (README "All three together")
    assert RunConfig.completed({})["redistill_lr"] == 0.0  # a later field: older run folders read as the profile's


def test_distill_c_lr_is_constant_or_falls_as_one_over_the_root_of_the_round():
    from distill.rd import distill_c_lr

    assert distill_c_lr(3e-3, 7, "constant") == 3e-3
    assert distill_c_lr(3e-3, 1, "inverse-sqrt") == 3e-3
    assert distill_c_lr(3e-3, 16, "inverse-sqrt") == pytest.approx(7.5e-4)
    with pytest.raises(ValueError):
        distill_c_lr(3e-3, 2, "cosine")
