"""The project's layers point one way (README, "Layers"): a module imports only from its own
layer or lower ones, no modules import each other in a circle, and no two top-level packages
depend on each other.

Every import counts: module level, inside functions, relative, and module names written as
strings for importlib (the backend table of `runtimes`, the command modules of the CLI).
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("plt_port", "metal_kernels", "runtimes", "exporters", "demo")
APP_MODULES = ("plt_port.app",)

# (layer, name, module prefixes): the longest matching prefix decides; lower layers may not
# import higher ones. Each prefix is one folder (README, "Layers").
LAYERS = [
    (0, "core", ("plt_port",)),
    (1, "kernels", ("metal_kernels",)),
    (2, "framework models", ("runtimes.models",)),
    (3, "exporters", ("exporters",)),
    (4, "backends", ("runtimes.backends",)),
    (5, "engine", ("runtimes",)),
    (6, "app", APP_MODULES + ("demo",)),
]
# The MLX export converts tensors itself: the exporters never import the backends' package.
FORBIDDEN_PACKAGE_IMPORTS = {("exporters", "runtimes")}


def project_modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    modules[dotted.removesuffix(".__init__")] = path
    return modules


MODULES = project_modules()


def layer_of(module: str) -> int:
    matches = [(len(prefix), layer) for layer, _, prefixes in LAYERS for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1]


def package_of(module: str) -> str:
    if any(module == p or module.startswith(p + ".") for p in APP_MODULES):
        return "app"
    return module.split(".")[0]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    is_package = MODULES[module].endswith("__init__.py")
    parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(parts + ([node.module] if node.module else []))


def _project_module(name: str) -> str | None:
    """The project module `name` names, or its closest enclosing one."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _string_imports(tree: ast.AST) -> set[str]:
    """Module names in strings: "runtimes.backends.torch_backend", and f"plt_port.app.commands.{name}"
    (every module of that package)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODULES:
            found.add(node.value)
        elif isinstance(node, ast.JoinedStr) and node.values \
                and isinstance(node.values[0], ast.Constant) \
                and str(node.values[0].value).endswith("."):
            prefix = node.values[0].value
            found |= {m for m in MODULES if m.startswith(prefix) and prefix[:-1] in MODULES}
    return found


def _module_level_nodes(node: ast.AST):
    """The nodes that run when the module is imported: everything outside function bodies."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from _module_level_nodes(child)


def imports_of(module: str) -> list[tuple[str, bool]]:
    """(imported project module, imported at module level?) for every import in `module`."""
    with open(MODULES[module], encoding="utf-8") as f:
        tree = ast.parse(f.read(), MODULES[module])
    top_level = {id(node) for node in _module_level_nodes(tree)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = _project_module(name)
            if target and target != module:
                found.append((target, id(node) in top_level))
    found += [(target, False) for target in _string_imports(tree) if target != module]
    return found


IMPORTS = {module: imports_of(module) for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_walk_sees_every_kind_of_import():
    assert ("plt_port.config", True) in IMPORTS["runtimes.models.mlx_model"]
    assert ("runtimes.backends.torch_backend", False) in IMPORTS["runtimes.backends"]  # importlib
    assert ("plt_port.app.commands.generate", False) in IMPORTS["plt_port.app.cli"]  # f-string
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def upward_imports(imports: dict[str, list[tuple[str, bool]]]) -> list[str]:
    return sorted(f"{module} (layer {layer_of(module)}) imports {target} "
                  f"(layer {layer_of(target)})"
                  for module, found in imports.items() for target, _ in found
                  if layer_of(target) > layer_of(module))


def test_no_module_imports_a_higher_layer():
    upward = upward_imports(IMPORTS)
    assert not upward, "upward imports:\n" + "\n".join(upward)


@pytest.mark.parametrize("importer, imported", [
    ("runtimes.backends.torch_backend", "runtimes.engine"),     # a backend using the engine
    ("runtimes.models.mlx_model", "runtimes.backends.base"),    # a model file using a backend
    ("runtimes.engine", "plt_port.app.server"),                 # the engine using the app
    ("exporters.onnx_export", "runtimes.backends.onnx_backend"),
    ("plt_port.tokenizer", "runtimes.sampling"),
])
def test_a_planted_upward_import_is_caught(importer, imported):
    planted = {**IMPORTS, importer: IMPORTS[importer] + [(imported, False)]}
    assert upward_imports(planted) == [f"{importer} (layer {layer_of(importer)}) imports "
                                       f"{imported} (layer {layer_of(imported)})"]


def project_folders() -> set[str]:
    """Every folder of the project's packages that holds a module, as a dotted name."""
    return {module if path.endswith("__init__.py") else module.rpartition(".")[0]
            for module, path in MODULES.items()}


def test_every_folder_is_one_layer_and_the_readme_table_says_so():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = readme[readme.index("## Layers"):].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == \
        [f"{layer} {name}" for layer, name, _ in LAYERS]
    for (layer, _, prefixes), row in zip(LAYERS, rows):
        folders = row.split("|")[2]
        for prefix in prefixes:
            assert f"`{prefix.replace('.', '/')}/`" in folders, (layer, prefix)
    layer_roots = {prefix for _, _, prefixes in LAYERS for prefix in prefixes}
    assert layer_roots <= project_folders()


def test_no_module_level_import_cycle():
    graph = {module: {t for t, top in imports if top} for module, imports in IMPORTS.items()}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("importer, imported", sorted(FORBIDDEN_PACKAGE_IMPORTS))
def test_package_does_not_import(importer, imported):
    offending = sorted(module for module, imports in IMPORTS.items()
                       if package_of(module) == importer
                       and any(package_of(t) == imported for t, _ in imports))
    assert not offending, f"{importer} modules that import {imported}: {offending}"


def test_no_cycle_between_packages():
    graph = defaultdict(set)
    for module, imports in IMPORTS.items():
        graph[package_of(module)] |= {package_of(t) for t, _ in imports} - {package_of(module)}
    assert find_cycle(graph) is None
