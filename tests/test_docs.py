"""The docs stay true: README's config reference is the schema's, its CLI block names every
command and option the parser has (and no other), and every `docs/contract.md §N` the code
cites exists, as does every test the contract names."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cherry_train.cli import build_parser
from cherry_train.schemas.reference import config_reference

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
CONTRACT = REPO / "docs" / "contract.md"
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


CLI_START, CLI_END = "## CLI\n\n```\n", "```\n"


def _commands(parser, path=()):
    """(words after `cherry`, parser) for every command that takes options, nested ones
    (`drive login`, `data pack`, `sweep best`) included."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        yield path, parser
        return
    for name, sub in actions[0].choices.items():
        yield from _commands(sub, (*path, name))


def _readme_cli_entries() -> dict[str, str]:
    """README's CLI block: first words of each `cherry ...` line -> that line and the indented
    lines that continue it."""
    block = README.read_text().split(CLI_START, 1)[1].split(CLI_END, 1)[0]
    entries, current = {}, None
    for line in block.splitlines():
        if line.startswith("cherry "):
            current = line
            entries[current] = line
        elif current is not None and line.startswith(" "):
            entries[current] += "\n" + line
    return entries


def _options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


def test_readme_cli_block_lists_every_option_of_every_command_and_no_other():
    entries = _readme_cli_entries()
    for path, parser in _commands(build_parser()):
        head = "cherry " + " ".join(path)
        found = [text for first, text in entries.items() if re.match(rf"{head}(\s|$)", first)]
        assert len(found) == 1, f"README's CLI block has no line `{head} ...`"
        options = {o for a in parser._actions for o in a.option_strings
                   if o.startswith("--") and o != "--help"}
        shown = _options(found[0])
        assert options - shown == set(), f"`{head}`: README's CLI block omits these options"
        assert shown - options == set(), f"`{head}`: README's CLI block names options it lacks"
        for action in parser._actions:  # a list of choices shown is the parser's list
            for option in action.option_strings:
                m = re.search(rf"(?<![\w-]){option} ([\w-]+(?:\|[\w-]+)+)", found[0])
                if m and action.choices:
                    assert m.group(1).split("|") == list(action.choices), (head, option)
    top = {o for a in build_parser()._actions for o in a.option_strings
           if o.startswith("--") and o != "--help"}
    assert top <= _options("\n".join(e for e in entries if e.startswith("cherry --"))), top


def _sources() -> dict[Path, str]:
    """Every file that may cite the contract: code, tests, benchmarks, docs, README."""
    paths = [*REPO.glob("cherry_train/**/*.py"), *REPO.glob("tests/*.py"),
             *REPO.glob("benchmarks/*.py"), *REPO.glob("docs/*.md"), README,
             *REPO.glob("notebooks/*.ipynb")]
    return {p: p.read_text() for p in paths}


def _sections() -> set[int]:
    return {int(n) for n in re.findall(r"^## §(\d+) ", CONTRACT.read_text(), re.M)}


def test_every_contract_section_cited_exists():
    sections, cited = _sections(), {}
    for path, text in _sources().items():
        for m in re.finditer(r"contract\.md\s*§(\d+)(?:\s*-\s*(\d+))?", text):
            first, last = int(m.group(1)), int(m.group(2) or m.group(1))
            for n in range(first, last + 1):
                cited.setdefault(n, []).append(path.relative_to(REPO).as_posix())
    assert cited, "nothing cites docs/contract.md: this test would guard nothing"
    missing = {n: where for n, where in cited.items() if n not in sections}
    assert missing == {}, f"docs/contract.md has no such section (its: {sorted(sections)})"
    inner = {int(n) for n in re.findall(r"§(\d+)", CONTRACT.read_text())}
    assert inner <= sections, f"docs/contract.md refers to sections it lacks: {inner - sections}"


def test_the_design_page_outside_the_repository_is_cited_nowhere():
    """The contract is docs/contract.md; a page that is not in the repository is no contract."""
    design = re.compile(r"DESIGN\.md")
    citing = sorted(p.relative_to(REPO).as_posix() for p, text in _sources().items()
                    if design.search(text))
    assert citing == [], "cite docs/contract.md §N instead"


def test_every_test_the_contract_names_exists():
    named = re.findall(r"tests/(test_\w+\.py)::(test_\w+)", CONTRACT.read_text())
    assert len(named) > 10
    missing = [f"{file}::{test}" for file, test in named
               if not re.search(rf"^def {test}\(", (REPO / "tests" / file).read_text(), re.M)]
    assert missing == [], "docs/contract.md names tests that do not exist"
