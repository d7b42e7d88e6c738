"""The engine's shape, checked: imports inside meshcore/_http run one way (no cycle, counting
imports under TYPE_CHECKING and inside functions), and only `_loop.py` reaches into the event
loops' internals."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import meshcore._http

PACKAGE = Path(meshcore._http.__file__).parent
MODULES = {p.stem: p for p in PACKAGE.glob("*.py")}


def sibling_imports(path: Path) -> set[str]:
    """Every module of the package `path` imports, wherever the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found & set(MODULES)


def test_no_import_cycle_inside_the_engine() -> None:
    graph = {name: sibling_imports(path) for name, path in MODULES.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        if name in done:
            return
        for other in graph[name]:
            visit(other, path + (name,))
        done.add(name)

    for name in graph:
        visit(name, ())
    assert "_loop" not in graph["_socket"]  # the contract knows nothing of the loops


# What only _loop.py may name: private modules and attributes of anyio, asyncio, uvloop, trio.
_INTERNALS = re.compile(
    r"anyio\._|asyncio\.selector_events|\._transport\b|\._protocol\b|read_queue|"
    r"uvloop|\btrio\b|get_running_loop|add_reader|add_writer"
)


def test_event_loop_internals_stay_in_one_module() -> None:
    for name, path in MODULES.items():
        if name == "_loop":
            continue
        code = "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
        )
        code = re.sub(r'"""(.|\n)*?"""', "", code)  # docstrings may mention them
        assert not _INTERNALS.search(code), f"{path.name} reaches into an event loop"
