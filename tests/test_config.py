"""protocol.config: the run configuration's defaults, codecs and validation."""

from __future__ import annotations

import math

import pytest


def test_run_config_merge_defences_defaults_and_validation():
    from protocol.config import ConfigError, RunConfig, resolve_run_config

    config = RunConfig()
    assert (config.weight_cap, config.kept_tolerance, config.clip_norm) == (4.0, math.inf, math.inf)
    assert RunConfig.from_record(config.to_record()) == config
    assert RunConfig.from_record(config.to_dict()) == config  # inf is written as "inf" and read back
    assert (config.claims, config.clip_multiple, config.row_multiple) == ("trusted", math.inf, math.inf)
    assert config.operating_threshold == 0.5 == RunConfig.completed({})["operating_threshold"]  # older runs' config.json
    for key, value in (("weight-cap", 0.5), ("weight-cap", float("nan")), ("clip-norm", 0.0),
                       ("kept-tolerance", -0.01), ("clip-multiple", 0.9), ("claims", "believed"),
                       ("row-multiple", 0.5), ("row-multiple", float("nan")), ("operating-threshold", 0.01),
                       ("operating-threshold", 1.0)):
        with pytest.raises(ConfigError) as error:
            resolve_run_config({key: value})
        assert error.value.key == key
