"""docs/ARCHITECTURE.md's table of rooms is what the code imports, and no room's modules import in a cycle.

Every import statement counts, those inside functions and ``if TYPE_CHECKING:`` too: a
deferred import is still a dependency, only a later one. Dotted paths in settings
(``MIDDLEWARE``, ``SESSION_ENGINE``) are configuration's to name, and are not imports here.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
# The project's Python packages that are not rooms of the table: they may import anything.
NOT_ROOMS = {"tests", "bench"}
# Import cycles between modules, or between a room's first-level packages and modules
# (``ingest.sources`` stands for every module under it): none.
KNOWN_CYCLES: set[frozenset[str]] = set()


def table() -> dict[str, set[str]]:
    """The Components table: each Python room and the rooms its "may import" cell names."""
    section = ARCHITECTURE.read_text().split("\n## Components\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()]
    rows = [cells for cells in rows if len(cells) == 3 and re.fullmatch(r"`\w+/`", cells[0])]
    rooms = {cells[0].strip("`/") for cells in rows}
    allowed: dict[str, set[str]] = {}
    for first, _, may in rows:
        names = set(re.findall(r"`(\w+)`", may))
        assert names or may in ("everything", "Django only"), f"{first}: cannot read {may!r}"
        allowed[first.strip("`/")] = rooms if may == "everything" else names
    return allowed


def packages() -> set[str]:
    """The project's top-level Python packages."""
    return {path.parent.name for path in ROOT.glob("*/__init__.py")}


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(room: str) -> dict[str, Path]:
    return {module_of(path): path for path in sorted((ROOT / room).rglob("*.py"))}


def imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import in a module, relative ones made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:  # "from pkg import mod" imports the module pkg.mod
                yield node.lineno, f"{base}.{alias.name}"


def test_the_table_names_every_package():
    assert set(table()) == packages() - NOT_ROOMS


def test_rooms_import_only_what_the_table_allows():
    allowed = table()
    project = packages()
    wrong = []
    for room, may in allowed.items():
        for module, path in modules(room).items():
            for line, name in imports(module, path):
                top = name.partition(".")[0]
                if top in project and top != room and top not in may:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "imports the table in docs/ARCHITECTURE.md does not allow:\n" + "\n".join(wrong)


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected parts of a graph that hold more than one node."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for after in graph.get(todo.pop(), ()):
                if after not in seen:
                    seen.add(after)
                    todo.append(after)
        return seen

    reached = {node: reach(node) for node in graph}
    parts = {frozenset({node} | {o for o in reached[node] if node in reached[o]}) for node in graph}
    return {part for part in parts if len(part) > 1}


def module_graph(room: str) -> dict[str, set[str]]:
    """Each module of a room and the room's modules it imports."""
    known = modules(room)
    graph: dict[str, set[str]] = {module: set() for module in known}
    for module, path in known.items():
        for _, name in imports(module, path):
            while name and name not in known:  # "from pkg import name" where name is not a module
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def part_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same imports between a room's first-level parts (``ingest.sources.live`` is ``ingest.sources``)."""

    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    parts: dict[str, set[str]] = {}
    for module, after in graph.items():
        parts.setdefault(part(module), set()).update(part(a) for a in after if part(a) != part(module))
    return parts


def test_no_import_cycles_within_a_room():
    found: set[frozenset[str]] = set()
    for room in table():
        graph = module_graph(room)
        found |= cycles(graph) | cycles(part_graph(graph))
    assert found == KNOWN_CYCLES, "import cycles (each a set of modules, or of a room's first-level parts)"
