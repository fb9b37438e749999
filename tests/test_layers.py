"""The import rules of docs/ARCHITECTURE.md, checked on the source: every import points down
the layers, and no production modules import each other in a circle (lazy imports inside
functions count too: a circle through one is still a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core.config import REPO_ROOT

# Bottom to top; a module may import its own layer or one below. The most specific prefix wins.
LAYERS: dict[str, int] = {
    "core.config": 0,
    "core.errors": 0,
    "core.retry": 0,
    "core.naming": 0,
    "core": 1,  # the shared modules: payload, media, video, storage, progress, models, ...
    "core.tasks": 2,
    "core.infer": 3,
    "core.splat": 3,
    "core.stages": 3,
    "core.apps": 4,
    "handlers": 5,
    "core.serve": 6,
}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        level = LAYERS.get(".".join(parts[:end]))
        if level is not None:
            return level
    return None


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def production_modules() -> dict[str, Path]:
    paths = [*(REPO_ROOT / "core").rglob("*.py"), *(REPO_ROOT / "handlers").glob("*.py")]
    return {module_name(path): path for path in paths}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from core import control` imports core.control; `from core.x import y` core.x.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = production_modules()
    known = set(modules)
    edges = {}
    for name, path in modules.items():
        # A module importing its own package (`from core.tasks import register`) is not an edge.
        parents = {name.rsplit(".", n)[0] for n in range(1, name.count(".") + 1)}
        edges[name] = imports_of(path, known) - {name} - parents
    return edges


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    assert [name for name in graph if layer_of(name) is None] == []


def test_imports_point_down(graph: dict[str, set[str]]) -> None:
    upward = [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in sorted(graph.items())
        for target in sorted(targets)
        if (layer_of(target) or 0) > (layer_of(source) or 0)
    ]
    assert upward == []


def test_the_rules_the_layers_stand_for(graph: dict[str, set[str]]) -> None:
    """Spelled out, so a change to LAYERS cannot quietly drop one."""
    broken = []
    for source, targets in graph.items():
        for target in targets:
            if target.startswith("core.serve") and not source.startswith("core.serve"):
                broken.append(f"{source} imports the local server ({target})")
            if source.startswith("core.tasks") and target.startswith(("core.apps", "core.infer")):
                broken.append(f"task module {source} imports {target}")
            if source.startswith("core.splat") and target.startswith(("core.apps", "core.tasks")):
                broken.append(f"the splat pipeline ({source}) imports {target}")
    assert broken == []


def test_no_import_circle(graph: dict[str, set[str]]) -> None:
    # Tarjan's strongly connected components: any with two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert circles == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: a task importing an app, and a circle, are both found."""
    fake = tmp_path / "core" / "tasks"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from core.apps import studio\nimport core.serve.app\n")
    found = imports_of(fake / "bad.py", {"core.apps", "core.apps.studio", "core.serve.app"})
    assert found == {"core.apps", "core.apps.studio", "core.serve.app"}
    assert layer_of("core.tasks.bad") == 2 and layer_of("core.apps.studio") == 4
