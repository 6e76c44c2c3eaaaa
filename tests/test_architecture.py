"""The package keeps the shape docs/architecture.md draws: floors that only import downwards (the
package's parts, and inside worker/ its sub-packages and top modules), no import circle
(function-level imports included), no module over 400 lines, every part placed on a floor, and
a laptop install that imports without torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cherry_train"
MAX_LINES = 400


PACKAGE_FLOORS = "## Floors"
WORKER_FLOORS = "## The worker, top to bottom"


def floors(heading: str = PACKAGE_FLOORS) -> dict[str, int]:
    """part -> floor, from the table under `heading` in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert f"\n{heading}\n" in text, f"docs/architecture.md has no section {heading!r}"
    section = re.split(r"\n#{1,6} ", text.split(f"\n{heading}\n", 1)[1], maxsplit=1)[0]
    found = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|([^|]*)\|", line)
        if m:
            for part in re.findall(r"`([\w.]+)`", m.group(2)):
                found[part] = int(m.group(1))
    return found


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def part(module: str) -> str:
    """The floor-table name of a module: its top-level package or module below cherry_train."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "cherry_train"


def worker_part(module: str) -> str | None:
    """The worker table's name of a module inside worker/: its sub-package or top module
    (None for worker/__init__.py and for modules outside worker/)."""
    pieces = module.split(".")
    return pieces[2] if len(pieces) > 2 and pieces[1] == "worker" else None


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The cherry_train modules `name` imports, anywhere in it (function bodies included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_part_of_the_package_has_a_floor():
    table = floors()
    parts = {part(m) for m in modules()}
    assert parts - set(table) == set(), "place these in docs/architecture.md's floor table"
    assert set(table) - parts == set(), "docs/architecture.md names parts that do not exist"


def test_imports_only_point_down(graph):
    table = floors()
    upward = []
    for module, targets in graph.items():
        for target in targets:
            a, b = part(module), part(target)
            if a == b or table[b] < table[a] or (a, b) == ("client", "worker"):
                continue
            upward.append(f"{module} -> {target} (floor {table[a]} -> {table[b]})")
    assert upward == []


def test_every_part_of_the_worker_has_a_floor():
    table = floors(WORKER_FLOORS)
    parts = {p for m in modules() if (p := worker_part(m))}
    assert parts - set(table) == set(), "place these in docs/architecture.md's worker table"
    assert set(table) - parts == set(), "docs/architecture.md's worker table names no such part"


def test_imports_inside_the_worker_only_point_down(graph):
    """worker/'s sub-packages and top modules: each imports only from a lower floor of the
    worker's table (or from inside itself), function-level imports included."""
    table = floors(WORKER_FLOORS)
    upward = []
    for module, targets in graph.items():
        for target in targets:
            a, b = worker_part(module), worker_part(target)
            if a is None or b is None or a == b or table[b] < table[a]:
                continue
            upward.append(f"{module} -> {target} (floor {table[a]} -> {table[b]})")
    assert upward == []


def test_no_import_circles(graph):
    circles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_train_py_stays_a_handful_of_functions():
    """worker/training/train.py in the shape of torchvision's reference script: what grows goes to
    the module of its concern (steps, saving, compiling, progress, data)."""
    assert len((PACKAGE / "worker" / "training" / "train.py").read_text().splitlines()) <= 300


def test_the_client_side_imports_without_torch():
    blocked = ("import sys\n"
               "sys.modules['torch'] = sys.modules['torchvision'] = None  # ImportError\n"
               "import cherry_train.cli, cherry_train.cli.commands, cherry_train.client.submit\n"
               "import cherry_train.client.status, cherry_train.client.watch\n"
               "import cherry_train.client.fetch, cherry_train.client.compare\n"
               "import cherry_train.jobqueue.lifecycle, cherry_train.jobqueue.views\n")
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
