"""Every verb's options: no abbreviations, and help text that gives each default."""

from __future__ import annotations

import argparse

import pytest

from pixart_tune.cli import VERBS
from tests.conftest import REPO


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def parser_of(verb: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a verb's real ``cli`` builds, caught as it starts parsing."""

    def catch(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Parsed) as caught:
        VERBS[verb].main([])
    return caught.value.parser


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_option_has_help_with_its_default_and_no_abbreviations(verb, monkeypatch):
    parser = parser_of(verb, monkeypatch)
    assert parser.allow_abbrev is False
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{verb} {name} has no help text"
        shown = formatter._expand_help(action)
        if action.option_strings and action.default not in (None, False, [], "", argparse.SUPPRESS):
            assert "default" in shown, f"{verb} {name}: the help does not give the default {action.default!r}"


def test_prepare_shows_the_config_defaults_its_flags_stand_for(monkeypatch):
    """prepare's flags default to None (a --config file may set them); the help gives PrepareConfig's default."""
    from pixart_tune.config import field_defaults
    from pixart_tune.data.prepare import PrepareConfig

    parser = parser_of("prepare", monkeypatch)
    defaults = field_defaults(PrepareConfig)
    checked = 0
    for action in parser._actions:
        if action.dest in defaults and action.nargs != 0 and defaults[action.dest] not in (None, "", ()):
            value = defaults[action.dest]
            expected = ", ".join(value) if isinstance(value, tuple) else str(value)
            assert f"(default: {expected})" in parser._get_formatter()._expand_help(action), action.dest
            checked += 1
    assert checked >= 15


def test_an_abbreviated_option_is_refused(capsys):
    # The verb's own entry: pixart_tune.cli.main would also set the process's logging up.
    with pytest.raises(SystemExit) as exited:
        VERBS["train"].main([str(REPO / "recipes" / "tiny_cpu.yaml"), "--resum", "latest"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --resum" in capsys.readouterr().err


def test_a_verbs_config_comes_from_file_then_flags_then_set(tmp_path):
    """One config, three spellings: --config YAML, the flags, --set key=value; later ones win."""
    from pixart_tune.commands.parsing import ConfigFlags, verb_parser
    from pixart_tune.errors import UserError
    from pixart_tune.sampling import SampleConfig

    def parse(*argv):
        parser = verb_parser("pixart-tune sample", "test")
        flags = ConfigFlags(parser, SampleConfig)
        flags.add("--model")
        flags.add("--steps", type=int)
        flags.add("--seeds", type=int, nargs="+")
        return flags.config(parser.parse_args(list(argv)))

    recipe = tmp_path / "sample.yaml"
    recipe.write_text("model: from-file\nsteps: 7\nguidance: 3.0\nseeds: [1, 2]\n")
    config = parse("--config", str(recipe), "--steps", "9", "--set", "guidance=2.5")
    assert (config.model, config.steps, config.guidance, config.seeds) == ("from-file", 9, 2.5, [1, 2])
    assert parse("--model", "m", "--set", "steps=3").steps == 3
    with pytest.raises(UserError, match=r"--model is required \(or give model: in the --config file\)"):
        parse("--steps", "3")
    with pytest.raises(UserError, match="unknown key 'stpes'"):
        parse("--model", "m", "--set", "stpes=3")
