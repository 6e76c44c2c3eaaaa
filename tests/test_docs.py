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


DEMO_START, DEMO_END = "<!-- demo-summary:start -->\n```\n", "```\n<!-- demo-summary:end -->"


def test_readme_shows_what_the_demo_prints():
    """README's quick start shows the demo's summary: rendered here by the demo's own code from
    the figures README shows, so a line the demo adds or drops fails this test."""
    from datetime import datetime, timezone

    from cherry_train.demo.run import summary
    from cherry_train.schemas import JobState, Result

    cache = "~/.cache/cherry-train/datasets"
    result = Result(
        job_id="20261202-101500-cherry-demo-7f3a", state=JobState.succeeded, attempts=1,
        finished_at=datetime(2026, 12, 2, tzinfo=timezone.utc), epochs_completed=8,
        best={"epoch": 8, "val_accuracy": 0.948, "val_loss": 0.15}, images_per_second=188,
        device="CPU (2 threads)", wall_seconds=59.5,
        export={"onnx": {"path": "model.onnx", "sha256": "ab" * 32, "images": 256}},
        data_cache={"train": {"local": f"{cache}/train-5d41402abc4b/files"},
                    "val": {"local": f"{cache}/val-7d793037a076/files"}})
    lines = summary(result, Path("~/.local/share/cherry-train/demo"), ".venv/bin/cherry")
    expected = "\n".join(lines) + "\n"
    shown = README.read_text().split(DEMO_START, 1)[1].split(DEMO_END, 1)[0]
    assert shown == expected, f"README's demo summary is stale; the demo prints:\n{expected}"
