"""Local differential privacy of client deltas (protocol/privacy.py): clipping, noise, the Opacus
accountant, the settings that switch it on (off by default) and the summary's epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.parts import delta_norm
from protocol.privacy import (DP_CLIP_FACTOR, DP_NORM, RDP_ORDERS, clip_to_norm, epsilon_spent, gaussian_noise,
                              is_on, noise_generator, privatise)


def a_delta(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"neck.w": scale * torch.randn(30, 20, generator=g), "head.b": scale * torch.randn(7, generator=g)}


# -- clipping ---------------------------------------------------------------------------------------


def test_clip_scales_a_long_delta_to_the_norm_as_one_vector():
    delta = a_delta(scale=3.0)
    norm = delta_norm(delta)
    assert norm > 1.0
    clipped, factor = clip_to_norm(delta, 1.0)
    assert delta_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert factor == pytest.approx(1.0 / norm)
    for name in delta:  # every tensor by the same factor: the direction is kept
        torch.testing.assert_close(clipped[name], delta[name] * factor)


def test_clip_leaves_a_short_delta_and_inf_untouched():
    delta = a_delta(scale=0.01)
    for max_norm in (10.0, math.inf):
        clipped, factor = clip_to_norm(delta, max_norm)
        assert factor == 1.0 and all(clipped[k] is delta[k] for k in delta)


def test_clip_rejects_bad_norms():
    with pytest.raises(ValueError):
        clip_to_norm(a_delta(), 0.0)
    with pytest.raises(ValueError):
        clip_to_norm({"w": torch.tensor([math.nan])}, 1.0)


# -- noise -------------------------------------------------------------------------------------------


def test_noise_has_the_asked_standard_deviation():
    zeros = {"a": torch.zeros(400, 500), "b": torch.zeros(100_000)}
    noised = gaussian_noise(zeros, 0.3, torch.Generator().manual_seed(1))
    values = torch.cat([v.flatten() for v in noised.values()]).double()
    assert float(values.std()) == pytest.approx(0.3, rel=0.01)  # 300k draws: std of the estimate ~0.13 %
    assert abs(float(values.mean())) < 0.3 * 5 / math.sqrt(values.numel())
    assert all(noised[k].shape == zeros[k].shape and noised[k].dtype == zeros[k].dtype for k in zeros)


def test_noise_is_reproducible_from_the_seed_and_independent_of_dict_order():
    delta = a_delta()
    first = gaussian_noise(delta, 0.5, noise_generator(123))
    again = gaussian_noise(dict(reversed(list(delta.items()))), 0.5, noise_generator(123))
    other = gaussian_noise(delta, 0.5, noise_generator(124))
    for name in delta:
        assert torch.equal(first[name], again[name])
        assert not torch.equal(first[name], other[name])
    assert gaussian_noise(delta, 0.0, noise_generator(1))["neck.w"] is delta["neck.w"]


def test_privatise_clips_then_adds_noise_of_std_sigma_times_clip():
    delta = a_delta(scale=5.0)
    sent, metrics = privatise(delta, 2.0, 0.25, noise_generator(7))
    clipped, factor = clip_to_norm(delta, 2.0)
    assert metrics[DP_CLIP_FACTOR] == pytest.approx(factor) and metrics[DP_NORM] == pytest.approx(delta_norm(delta))
    noise = torch.cat([(sent[k] - clipped[k]).flatten() for k in delta])
    assert float(noise.std()) == pytest.approx(0.5, rel=0.15)  # 607 draws
    expected = gaussian_noise(clipped, 0.5, noise_generator(7))
    assert all(torch.equal(sent[k], expected[k]) for k in delta)
    with pytest.raises(ValueError, match="finite clip"):
        privatise(delta, math.inf, 1.0, noise_generator(7))


def test_off_by_default_leaves_the_delta_bit_identical():
    from protocol.config import RunConfig

    config = RunConfig()
    assert not is_on(config.dp_clip, config.dp_noise)
    delta = a_delta()
    before = {k: v.clone() for k, v in delta.items()}
    sent, metrics = privatise(delta, config.dp_clip, config.dp_noise, None)
    assert metrics == {}
    assert all(sent[k] is delta[k] and torch.equal(sent[k], before[k]) for k in delta)


# -- the accountant ----------------------------------------------------------------------------------


def test_epsilon_falls_with_noise_and_grows_with_rounds():
    sigmas = [0.5, 1.0, 2.0, 4.0]
    by_sigma = [epsilon_spent(s, 2, 1e-5) for s in sigmas]
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == len(sigmas)
    by_rounds = [epsilon_spent(1.0, r, 1e-5) for r in (1, 2, 5, 20)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    assert epsilon_spent(1.0, 2, 1e-3) < epsilon_spent(1.0, 2, 1e-5)  # a looser delta, a smaller epsilon
    assert epsilon_spent(1.0, 0, 1e-5) == 0.0 and epsilon_spent(0.0, 3, 1e-5) == math.inf
    with pytest.raises(ValueError):
        epsilon_spent(1.0, 2, 0.0)


@pytest.mark.parametrize("sigma, rounds", [(0.5, 2), (1.0, 1), (1.0, 2), (2.0, 10)])
def test_epsilon_against_the_closed_form_rdp_bound_of_the_gaussian_mechanism(sigma, rounds):
    """r compositions of the Gaussian mechanism are (a, r a / (2 sigma^2))-RDP; the classic conversion
    eps <= min_a r a / (2 sigma^2) + log(1/delta) / (a - 1) has its minimum at a = 1 + sigma sqrt(2 log(1/delta) / r):
    eps = r / (2 sigma^2) + sqrt(2 r log(1/delta)) / sigma. Opacus's conversion (Balle et al. 2020) is tighter."""
    delta = 1e-5
    classic = rounds / (2 * sigma ** 2) + math.sqrt(2 * rounds * math.log(1 / delta)) / sigma
    eps = epsilon_spent(sigma, rounds, delta)
    assert 0.75 * classic < eps <= classic
    # and it is Balle et al.'s conversion of the same RDP curve over our orders, computed here by hand
    a = np.array(RDP_ORDERS)
    balle = rounds * a / (2 * sigma ** 2) - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    assert eps == pytest.approx(float(balle.min()), rel=1e-9)


# -- settings -----------------------------------------------------------------------------------------


def test_settings_are_checked_with_one_line_errors():
    from protocol.config import ConfigError, resolve_run_config

    for raw, key in [({"dp-noise": 1.0}, "dp-noise"), ({"dp-noise": -1.0, "dp-clip": 1.0}, "dp-noise"),
                     ({"dp-noise": math.inf, "dp-clip": 1.0}, "dp-noise"), ({"dp-clip": 0.0}, "dp-clip"),
                     ({"dp-clip": math.nan}, "dp-clip"), ({"dp-delta": 0.0}, "dp-delta"),
                     ({"dp-delta": 1.0}, "dp-delta"), ({"dp-clip": "abc"}, "dp-clip")]:
        with pytest.raises(ConfigError) as err:
            resolve_run_config(raw)
        assert err.value.key == key and "\n" not in str(err.value)
    config = resolve_run_config({"dp-clip": "0.5", "dp-noise": 1, "dp-delta": 1e-6})
    assert (config.dp_clip, config.dp_noise, config.dp_delta) == (0.5, 1.0, 1e-6)
    assert resolve_run_config({"dp-clip": 0.5}).dp_noise == 0.0  # clipping alone is allowed


def test_cli_flags_reach_the_config_and_bad_ones_stop_before_work(capsys):
    from sim.run import parse_args

    config = parse_args(["--dp-clip", "0.2", "--dp-noise", "0.5", "--dp-delta", "1e-6"]).config
    assert (config.dp_clip, config.dp_noise, config.dp_delta) == (0.2, 0.5, 1e-6)
    with pytest.raises(SystemExit) as stop:
        parse_args(["--dp-noise", "1"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m sim.run: error: --dp-noise") and "dp-clip" in last


def test_a_run_folder_from_before_dp_resumes_as_a_run_without_dp():
    """--resume reads a config.json written before the DP fields existed as DP off; one with DP on differs."""
    import json

    from protocol.config import RunConfig

    def written(config: RunConfig) -> dict:
        return json.loads(json.dumps(config.to_dict()))

    older = {k: v for k, v in written(RunConfig()).items() if not k.startswith("dp_")}
    assert RunConfig.completed(older) == RunConfig.completed(written(RunConfig()))
    assert RunConfig.completed(older) != RunConfig.completed(written(RunConfig(dp_clip=0.5, dp_noise=1.0)))

    def read_back(values: dict) -> RunConfig:
        return RunConfig.from_record({k.replace("_", "-"): v for k, v in values.items()})

    assert read_back(written(RunConfig(dp_clip=0.5, dp_noise=1.0))) == RunConfig(dp_clip=0.5, dp_noise=1.0)
    assert read_back(written(RunConfig())) == RunConfig()


# -- the summary ------------------------------------------------------------------------------------


def test_run_summary_gives_the_largest_epsilon_a_client_spent():
    from evaluation.metrics import run_summary
    from protocol.wire import make_record

    spec = {"client": 0, "private": ["cat"], "kept": ["car"], "dropped": [], "protected": []}

    def record(method, server_round, client, epsilon=None):
        extra = {"dp": {"epsilon": epsilon, "clip_factor": 0.5}} if epsilon is not None else {}
        return make_record(method, server_round, client, ap_before={"cat": 0.0, "car": 0.5},
                           ap_after={"cat": 0.2, "car": 0.5}, after={}, seconds={}, peak_rss_mb=1.0, **extra)

    records = [record("diredi", 1, 0, 4.7), record("diredi", 2, 0, 7.1), record("diredi", 1, 1, 4.7),
               record("fedavg", 1, 0)]
    methods = run_summary(records, [spec, {**spec, "client": 1}], [["cat"]], 2, 1.0)["methods"]
    assert methods["diredi"]["dp_epsilon"] == pytest.approx(7.1)
    assert methods["fedavg"]["dp_epsilon"] is None


# -- through real Flower + Ray ------------------------------------------------------------------------


@pytest.mark.slow
def test_clients_privatise_their_deltas_and_count_their_budget(smoke_cache):
    """Smoke profile, 2 clients, 2 rounds, DP with top-k on: every "train" reply reports the epsilon
    of its client's participations so far, and the delta that arrives carries the noise."""
    from protocol.config import resolve_run_config
    from protocol.privacy import DP_EPSILON, DP_PARTICIPATIONS
    from protocol.wire import DELTA, METRICS, PARTITION_ID, unpack_delta
    from sim.federation import run_federation
    from strategies.ledger import Recorder
    from session.workspace import Session

    clip, sigma = 0.05, 0.5
    session = Session.open(resolve_run_config({
        "profile": "smoke", "num-clients": 2, "rounds": 2, "methods": "diredi", "cache-dir": str(smoke_cache),
        "dp-clip": clip, "dp-noise": sigma, "delta-topk": 0.5}))
    seen, original = [], Recorder.split

    def spy(self, replies, step, server_round):
        replies = list(replies)
        seen.extend((step, server_round, r) for r in replies if step == "train")
        return original(self, replies, step, server_round)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Recorder, "split", spy)
            result = run_federation("diredi", session)
    finally:
        torch.set_num_threads(threads)
    assert result.recorder.failures == []
    assert sorted((r, int(m.content[METRICS][PARTITION_ID])) for _, r, m in seen) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    shapes = {k: v.shape for k, v in neck_head_of(session).items()}
    for _, server_round, reply in seen:
        metrics = reply.content[METRICS]
        assert metrics[DP_PARTICIPATIONS] == server_round
        assert metrics[DP_EPSILON] == pytest.approx(epsilon_spent(sigma, server_round, 1e-5))
        assert 0 < metrics[DP_CLIP_FACTOR] <= 1 and metrics[DP_NORM] > 0
        received = unpack_delta(reply.content.array_records[DELTA], shapes)
        coordinates = sum(v.numel() for v in received.values())
        # half of the entries sent, each of a vector whose noise alone has norm ~ sigma C sqrt(d)
        assert delta_norm(received) > 0.5 * sigma * clip * math.sqrt(coordinates)


def neck_head_of(session):
    from models.parts import neck_head

    return neck_head(session.chain.tutor)


def test_records_carry_the_dp_figures_and_the_report_shows_epsilon_per_client():
    from protocol.wire import PARTITION_ID, record_from_metrics
    from report.writer import privacy_section

    plain = record_from_metrics("diredi", 1, {PARTITION_ID: 0}, None)
    assert "dp" not in plain and privacy_section([plain]) == []
    records = [record_from_metrics("diredi", r, {PARTITION_ID: c, "dp.epsilon": 3.0 * r + c, "dp.clip_factor": 0.5,
                                                 "dp.participations": r}, None)
               for r in (1, 2) for c in (0, 1)]
    assert records[0]["dp"] == {"epsilon": 3.0, "clip_factor": 0.5, "participations": 1.0}
    lines = privacy_section(records)
    assert lines[0] == "## Differential privacy"
    assert "| diredi | 1 | 2 | 7 | 0.50 |" in lines  # the epsilon after the client's last round
