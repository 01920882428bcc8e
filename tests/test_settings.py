"""One source for every setting: the settings dataclasses are the options (transforms/settings.py)."""

import argparse
import dataclasses

import pytest

from pipeline.argtypes import OneLineParser, add_settings_arguments
from pipeline.options import SETTINGS_GROUPS, AuditConfig, build_parser, parse_args
from pipeline.runners import RUNNER_DESTS
from transforms.settings import option, option_fields, settings_from, settings_options


def test_every_group_parses_to_its_dataclass_defaults_and_back_to_flat_option_names():
    config, _ = parse_args(["--input", "x", "--model", "m"])
    flat = config.as_json()
    for group, (cls, prefix) in SETTINGS_GROUPS.items():
        assert getattr(config, group) == cls()
        for name, field in option_fields(cls, prefix):
            assert flat[name] == field.default, name  # the manifest's "options" keep the command-line names
    # every option field (the job's own and the groups') is on the command line once, under its name, with
    # the field's default: nothing else declares an option of the audit
    parser = build_parser()
    for cls, prefix in [(AuditConfig, ""), *SETTINGS_GROUPS.values()]:
        for name, field in option_fields(cls, prefix):
            actions = [a for a in parser._actions if a.dest == name and a.default is not argparse.SUPPRESS]
            assert len(actions) == 1, name
            assert actions[0].default == field.default or field.metadata.get("env"), name
    own = {name for name, _ in option_fields(AuditConfig)}
    grouped = {name for cls, prefix in SETTINGS_GROUPS.values() for name, _ in option_fields(cls, prefix)}
    # the rest: --help, --help_beam and the runner shorthands' own options (pipeline/runners.py)
    assert {a.dest for a in parser._actions} - own - grouped == {"help", "help_beam", *RUNNER_DESTS}


def test_values_given_reach_the_groups():
    config, _ = parse_args(["--input", "x", "--model", "m", "--pointing_tolerance", "30",
                            "--strategy_max_clusters", "3", "--sanity_images", "0", "--min_images", "4",
                            "--check_moves_inside_boxes"])
    assert config.flags.pointing_tolerance_px == 30.0
    assert config.strategies.max_clusters == 3
    assert config.checks.sanity_images == 0
    assert config.compare.min_images == 4 and config.compare.check_moves_inside_boxes is True


@dataclasses.dataclass(frozen=True)
class _Example:
    limit: float = option(0.25, "A share", kind="share")
    rounds: int = option(3, "How many", name="example_rounds", kind="positive")
    strict: bool = option(False, "Be strict")
    internal: int = 7  # not an option


def test_a_new_option_is_one_field(capsys):
    parser = OneLineParser(prog="example")
    add_settings_arguments(parser, _Example, prefix="ex_")
    args = parser.parse_args(["--ex_limit", "0.5", "--example_rounds", "4", "--ex_strict"])
    assert settings_from(_Example, args, "ex_") == _Example(limit=0.5, rounds=4, strict=True)
    assert settings_from(_Example, parser.parse_args([]), "ex_") == _Example()
    # a manifest written before an option existed: the missing one keeps its default
    assert settings_from(_Example, {"ex_limit": 0.1}, "ex_") == _Example(limit=0.1)
    assert settings_options(_Example(), "ex_") == {"ex_limit": 0.25, "example_rounds": 3, "ex_strict": False}
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--ex_limit", "1.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ex_limit" in err[0] and "a share between 0 and 1" in err[0]


def test_an_option_field_says_how_it_is_checked():
    with pytest.raises(ValueError, match="kind"):
        option(1, "x", kind="percent")
    with pytest.raises(ValueError, match="bool"):
        option(1, "no kind and not a bool")
