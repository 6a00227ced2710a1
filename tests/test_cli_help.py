"""``--help`` of ``fastclip train`` / ``fastclip eval``: every flag explained, each default shown once,
the model names listed, no reStructuredText markup left."""
import argparse
import re
import subprocess
import sys

import pytest

from fastclip.eval.main import build_parser as eval_parser
from fastclip.model import list_models
from fastclip.train.args import build_parser as train_parser

PARSERS = {"train": train_parser, "eval": eval_parser}


def _flags(parser: argparse.ArgumentParser):
    return [action for action in parser._actions if action.option_strings and action.help != argparse.SUPPRESS]


@pytest.mark.parametrize("command", PARSERS)
def test_every_flag_has_help_text(command):
    missing = [action.option_strings[0] for action in _flags(PARSERS[command]())
               if not (action.help or "").strip()]
    assert not missing, f"fastclip {command}: flags without help text: {missing}"


@pytest.mark.parametrize("command", PARSERS)
def test_each_default_is_shown_once(command):
    text = PARSERS[command]().format_help()
    entries = re.split(r"\n  (?=-)", text)  # one entry per flag
    twice = [entry.split()[0] for entry in entries if len(re.findall(r"\bdefault\b", entry, re.IGNORECASE)) > 1]
    assert not twice, f"fastclip {command}: a default named twice for {twice}"
    assert "(default: None)" not in text and "(default: False)" not in text


def test_model_help_lists_the_names():
    text = " ".join(train_parser().format_help().split())
    for name in list_models():
        assert name in text


def test_eval_help_is_plain_text():
    completed = subprocess.run([sys.executable, "-m", "fastclip", "eval", "--help"], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "--task" in completed.stdout
    assert "``" not in completed.stdout and "::" not in completed.stdout


def test_plain_text_rules():
    from fastclip.cli import plain_text

    assert plain_text("Run ``fastclip train``::\n\n    x\n") == "Run fastclip train:\n\n    x\n"
    assert plain_text("text\n::\n  y") == "text\n  y"
