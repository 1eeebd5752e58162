"""protocol.config: the run configuration's defaults, codecs and validation."""

from __future__ import annotations

import json
import math

import pytest


def test_run_config_merge_defences_defaults_and_validation():
    from protocol.config import ConfigError, RunConfig, resolve_run_config

    config = RunConfig()
    assert (config.weight_cap, config.kept_tolerance, config.clip_norm) == (2.0, math.inf, math.inf)
    assert RunConfig.from_record(config.to_record()) == config
    assert RunConfig.from_record(config.to_dict()) == config  # inf is written as "inf" and read back
    assert (config.claims, config.clip_multiple, config.row_multiple) == ("earned", 2.5, 4.0)
    # a run folder from before they were defaults (it lacks the fields) ran the trusted merge, and reads so
    completed = RunConfig.completed({})
    assert (completed["claims"], completed["clip_multiple"], completed["row_multiple"]) == ("trusted", "inf", "inf")
    trusted = json.loads(json.dumps(resolve_run_config({"claims": "trusted", "clip-multiple": math.inf,
                                                        "row-multiple": math.inf}).to_dict()))
    assert RunConfig.same_settings({k: v for k, v in trusted.items()
                                    if k not in ("claims", "clip_multiple", "row_multiple")}, trusted)
    assert config.operating_threshold == 0.5 == RunConfig.completed({})["operating_threshold"]  # older runs' config.json
    for key, value in (("weight-cap", 0.5), ("weight-cap", float("nan")), ("clip-norm", 0.0),
                       ("kept-tolerance", -0.01), ("clip-multiple", 0.9), ("claims", "believed"),
                       ("row-multiple", 0.5), ("row-multiple", float("nan")), ("operating-threshold", 0.01),
                       ("operating-threshold", 1.0), ("calibrate-reach", 2.5), ("calibrate-reach", math.inf)):
        with pytest.raises(ConfigError) as error:
            resolve_run_config({key: value})
        assert error.value.key == key


def test_spread_iters_resolves_to_four_times_distill_c_and_older_runs_read_as_they_ran():
    """--spread-iters 0 (the default) is four times a client's Distill C steps with spread on, recorded as
    the count; an explicit count is kept; without spread nothing is set. A run folder written when 0 meant
    "as many as Distill C" reads back as that many, so it never passes for a run of today's default."""
    from protocol.config import SPREAD_STEPS_PER_DISTILL_C, RunConfig, resolve_run_config

    on = resolve_run_config({"profile": "cpu", "spread": "on"})
    assert on.spread_iters == SPREAD_STEPS_PER_DISTILL_C * on.redistill_iters == 144
    assert resolve_run_config({"profile": "cpu", "spread": "on", "redistill-iters": 10}).spread_iters == 40
    assert resolve_run_config({"profile": "cpu", "spread": "on", "spread-iters": 36}).spread_iters == 36
    assert resolve_run_config({"profile": "cpu"}).spread_iters == 144  # spread is on by default
    assert resolve_run_config({"profile": "cpu", "spread": "off"}).spread_iters == 0
    written = json.loads(json.dumps(on.to_dict()))
    earlier = {**written, "spread_iters": 0}  # an older run folder: 36 steps were taken
    assert RunConfig.completed(earlier)["spread_iters"] == 36
    assert RunConfig.completed(earlier) == RunConfig.completed({**written, "spread_iters": 36})
    assert RunConfig.completed(earlier) != RunConfig.completed(written)
    assert RunConfig.completed({})["spread_iters"] == 0  # a folder from before spread: off, no server steps


def test_resume_compares_settings_not_where_the_cache_is():
    """A run folder made with the cache elsewhere (moved, or reached through a link) is the same run;
    any setting that changes what runs is not."""
    from protocol.config import RunConfig

    written = json.loads(json.dumps(RunConfig().to_dict()))
    assert RunConfig.same_settings({**written, "cache_dir": "/elsewhere/.cache"}, written)
    assert not RunConfig.same_settings({**written, "rounds": written["rounds"] + 1}, written)


def test_without_diredi_s_records_only_diredi_s_own_settings_may_differ():
    """A folder whose DiReDi never ran (or is redone) may go on with other DiReDi settings, but not with
    the settings the baselines read too: the local and oracle budgets (rd_iters, redistill_iters) and
    batches, the rounds, the data."""
    from protocol.config import RunConfig, diredi_only_settings

    written = json.loads(json.dumps(RunConfig().to_dict()))
    only = diredi_only_settings()
    assert {"claims", "clip_multiple", "spread", "redistill_ratio", "edge_average", "dp_noise"} <= set(only)
    assert not {"rd_iters", "redistill_iters", "batch_size", "direct_lr", "rounds", "scenario"} & set(only)
    other_diredi = {**written, "claims": "lifting", "clip_multiple": 2.0}
    assert not RunConfig.same_settings(other_diredi, written)
    assert RunConfig.same_settings(other_diredi, written, diredi_ran=False)
    for name, value in (("rd_iters", 7), ("direct_lr", 0.1), ("rounds", 3)):
        assert not RunConfig.same_settings({**written, name: value}, written, diredi_ran=False), name


def test_run_folders_made_before_the_protected_appeal_and_the_influence_bound_read_as_what_they_did():
    from protocol.config import RunConfig

    today = RunConfig()
    assert (today.protected_scope, today.row_bound, today.weight_cap, today.clip_share) == ("merge", "influence",
                                                                                            2.0, "sized")
    older = RunConfig.completed({})  # a config.json written before these settings existed
    assert (older["protected_scope"], older["row_bound"], older["clip_share"]) == ("delta", "norm", "whole")
