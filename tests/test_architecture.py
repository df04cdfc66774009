"""The layout rules of docs/architecture.md, checked on the source itself (no import is executed).

The library is built in floors; a module may import from its own floor or the floors below:

0. ``conventions`` (torch-free rules), ``jsonl`` (one JSON Lines reader) and ``triton_kernels`` (kernels with a torch
   reference per op): leaves;
1. components: ``ops``, ``layer_selection``, ``bridge``, ``connector``, ``dit``, ``think_tokens``, ``lora``,
   ``processing``;
2. composition: ``model``, ``denoising``, ``serialization``, ``pipeline`` (+ ``pipeline_inputs``), ``builders``,
   ``official``, ``tiny``;
3. libraries on the composition: ``rl`` (MR-GRPO and rewards), ``export``, ``training``, ``evaluation``; above them
   the ``shapes`` world, which plugs itself into their registries;
4. the application, ``cli``: the ``deepgen`` command, the bench suite and the fidelity report. Nothing imports it.

Besides the floors: no import cycle between modules, no module imports another module's ``_private`` name, and no
library file is over 600 lines. Every import counts, also one inside a function: a deferred import is still a
dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {
    "deepgen_components": "deepgen_components",
    "export": "deepgen_components.export",
    "training": "deepgen_components.training",
    "triton_kernels": "deepgen_components.triton_kernels",
}
MAX_LINES = 600

FLOOR_0 = ("conventions", "jsonl", "triton_kernels")
FLOOR_1 = ("ops", "layer_selection", "bridge", "connector", "dit", "think_tokens", "lora", "processing")
FLOOR_2 = ("model", "denoising", "serialization", "pipeline", "pipeline_inputs", "builders", "official", "tiny")
FLOOR_3 = ("rl", "export", "training", "evaluation")
FLOOR_3_TOP = ("shapes",)
FLOOR_4 = ("cli",)
FLOORS = {name: floor for floor, names in enumerate((FLOOR_0, FLOOR_1, FLOOR_2, FLOOR_3, FLOOR_4)) for name in names}
FLOORS.update({name: 3.5 for name in FLOOR_3_TOP})


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if folder == "deepgen_components" and parts[0] in PACKAGES:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module (or package) of ours that ``name`` (a module or a module.attribute) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module of ours, imported name or "", line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("deepgen_components"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, "", node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("deepgen_components")]
    return found


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _floor_name(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, imports in IMPORTS.items():
        targets = {_resolve(target) for target, _, _ in imports}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), iteratively."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return out


def test_every_module_has_a_floor():
    """A new top-level module must be placed on a floor here (and in docs/architecture.md) before it can land."""
    unplaced = sorted({_floor_name(m) for m in MODULES if m != "deepgen_components"} - set(FLOORS))
    assert not unplaced, f"modules on no floor: {unplaced}; add them to a FLOOR_* tuple and docs/architecture.md"


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: a two-module loop and a three-module loop are both reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_imports_go_down_the_floors_only():
    wrong = []
    for module, imports in IMPORTS.items():
        if module == "deepgen_components":  # the package's lazy public names (PEP 562) point at every floor
            continue
        here = FLOORS[_floor_name(module)]
        for target, _, line in imports:
            resolved = _resolve(target)
            if resolved is None or resolved == "deepgen_components":
                continue
            there = FLOORS[_floor_name(resolved)]
            if there > here:
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line} ({module}, floor {here}) imports "
                             f"{resolved} (floor {there})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("library", ["training", "rl", "evaluation", "export"])
def test_libraries_do_not_import_the_shapes_world(library):
    """The shapes world plugs into the trainer, the RL recipe and the evaluation harness through their registries;
    they never import it."""
    wrong = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
             for m, imports in IMPORTS.items() if _floor_name(m) == library
             for target, _, line in imports if _floor_name(_resolve(target) or "") == "shapes"]
    assert not wrong, "\n".join(wrong)


def test_nothing_below_the_application_imports_it():
    wrong = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
             for m, imports in IMPORTS.items() if _floor_name(m) != "cli"
             for target, _, line in imports if _floor_name(_resolve(target) or "") == "cli"]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {name} from {target}"
             for m, imports in IMPORTS.items()
             for target, name, line in imports
             if name.startswith("_") and not name.startswith("__") and _resolve(target) != m]
    assert not wrong, "\n".join(wrong)


def test_no_library_file_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_subcommands_are_registered_explicitly():
    """No ``__import__`` / ``importlib.import_module`` of our own modules by a computed name in the application:
    every subcommand module is imported by name, so the import graph above sees it."""
    dynamic = []
    for module, path in MODULES.items():
        if _floor_name(module) != "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = getattr(func, "id", None) or getattr(func, "attr", None)
                if name in ("__import__", "import_module"):
                    dynamic.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not dynamic, dynamic
