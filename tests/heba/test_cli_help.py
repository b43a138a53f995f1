"""heba-train's help: every command and option explained, defaults shown, the demo and the
default command named; the defaults quoted in the help are the recipes' own."""

from __future__ import annotations

import argparse

import pytest

from heba import cli
from heba.train.config import RECIPES, Config


def _commands(parser) -> dict:
    """``{name: sub-parser}`` of every ``heba-train`` command."""
    subs = [a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)]
    assert len(subs) == 1
    return subs[0].choices


def _options(parser):
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _takes_a_value(action) -> bool:
    return action.nargs != 0 and not action.required


def test_every_command_is_in_the_parser():
    parser = cli.build_parser()
    assert set(_commands(parser)) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_option_has_help_and_shows_its_default(command):
    sub = _commands(cli.build_parser())[command]
    missing = [a.option_strings or a.dest for a in _options(sub)
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"{command}: options without help: {missing}"
    no_default = [a.option_strings or a.dest for a in _options(sub)
                  if _takes_a_value(a) and "default" not in a.help]
    assert not no_default, f"{command}: options that do not say their default: {no_default}"
    sub.format_help()                       # every %(default)s expands


def test_top_level_help_names_the_demo_and_the_default_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "A bare `heba-train` runs the built-in demo" in out
    assert "`train` is the default command" in out
    for command in cli.COMMANDS:
        assert command in out


@pytest.mark.parametrize("field, flag", [("epochs", "--epochs"), ("lr", "--lr"),
                                         ("warmup_epochs", "--warmup-epochs"),
                                         ("batch_size", "--batch-size")])
def test_recipe_defaults_in_the_help_are_the_recipes(field, flag):
    sub = _commands(cli.build_parser())["train"]
    action = next(a for a in sub._actions if flag in a.option_strings)
    for name, over in RECIPES.items():
        value = over.get(field, getattr(Config(), field))
        assert f"{name} {value}" in action.help, (flag, name, value, action.help)


def test_dataset_help_names_both_kinds_of_data_set():
    sub = _commands(cli.build_parser())["train"]
    text = next(a for a in sub._actions if "--dataset" in a.option_strings).help
    for name in cli.clip_datasets() + cli.timm_datasets():
        assert name in text
    assert "CLIP backbones" in text and "timm:NAME backbones" in text


def test_split_help_says_what_subsample_defaults_to(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["split", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: all)" in out and "base" in out
