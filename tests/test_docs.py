"""The README stays true: its config reference is the schema's, its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from cherry_train.cli import build_parser
from cherry_train.schemas.reference import config_reference

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def test_readme_config_reference_matches_the_schema():
    text = README.read_text()
    documented = text.split(START, 1)[1].split(END, 1)[0]
    assert documented == config_reference(), (
        "README's config reference is stale: regenerate it with "
        "`python -m cherry_train.schemas.reference`")


def test_readme_cli_section_names_every_subcommand():
    text = README.read_text()
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in commands:
        assert re.search(rf"^cherry {name}\b", text, re.M), name
