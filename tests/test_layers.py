"""The package's imports only point down, and no module imports itself back through others.

Every ``import``/``from … import`` in ``ecif/`` counts, including those inside functions (a lazy import
is still a dependency).  The layers, lowest first, are the ones docs/method.md and the README name:
settings and plumbing → the device setting resolved by torch → data → objective → curvature →
fine-tuning → influence → models and the nearest-neighbour index → tasks → curation → background jobs
→ command line and the public API.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ecif"

LAYERS = (
    ("ecif.paths", "ecif.progress", "ecif.config"),
    ("ecif.devices",),
    ("ecif.run",),
    ("ecif.data",),
    ("ecif.objective",),
    ("ecif.curvature",),
    ("ecif.finetune",),
    ("ecif.influence",),
    ("ecif.models", "ecif.index"),
    ("ecif.tasks",),
    ("ecif.curation",),
    ("ecif.jobs",),
    ("ecif.cli", "ecif"),
)


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The ecif modules ``name`` imports (a submodule when the name imported is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known]
            candidates = submodules or [module]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate.startswith("ecif") and candidate != name:
                targets.add(candidate)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    for level, members in enumerate(LAYERS):
        if any(module == member or module.startswith(member + ".") for member in members if member != "ecif"):
            return level
    if module == "ecif":
        return len(LAYERS) - 1
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")


def owner(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_every_module_has_a_layer():
    for module in graph():
        layer_of(module)


def test_imports_only_point_down():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            same_package = owner(module) == owner(target) and module != "ecif"
            if not same_package and layer_of(target) >= layer_of(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not point to a lower layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The walk itself can fail: a planted two-module loop and an upward import are both found."""
    package = tmp_path / "ecif"
    (package / "objective").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "objective" / "__init__.py").write_text("")
    (package / "objective" / "a.py").write_text("from ecif.objective.b import x\nfrom ecif.tasks import y\n")
    (package / "objective" / "b.py").write_text("def f():\n    from . import a\n")
    known = {"ecif": package / "__init__.py", "ecif.objective": package / "objective" / "__init__.py",
             "ecif.objective.a": package / "objective" / "a.py", "ecif.objective.b": package / "objective" / "b.py",
             "ecif.tasks": package / "tasks.py"}
    assert imports("ecif.objective.a", known["ecif.objective.a"], known) == {"ecif.objective.b", "ecif.tasks"}
    assert imports("ecif.objective.b", known["ecif.objective.b"], known) == {"ecif.objective.a"}
    assert layer_of("ecif.tasks") > layer_of("ecif.objective.a")
