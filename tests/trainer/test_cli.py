"""The trainer's command-line flags map onto config keys (the shorthands a newcomer reads in --help)."""

from __future__ import annotations

import pytest

from trainer.__main__ import config_from, parse_args


def test_shorthand_flags_set_their_config_keys():
    args = parse_args(["--dataset", "logs/ratings.csv", "--output-dir", "runs/mine", "--set", "data.protocol=leave_one_out"])
    cfg = config_from(args, environ={})
    assert cfg.data.dataset == "logs/ratings.csv"
    assert cfg.run.output_dir == "runs/mine"
    assert cfg.data.protocol == "leave_one_out"


def test_without_flags_the_report_goes_to_the_default_folder():
    assert config_from(parse_args([]), environ={}).run.output_dir == "runs/latest"


def test_an_unknown_protocol_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"data.protocol must be one of \('random', 'temporal', 'leave_one_out'\), "
                                         r"got 'loo'"):
        config_from(parse_args(["--set", "data.protocol=loo"]), environ={})
