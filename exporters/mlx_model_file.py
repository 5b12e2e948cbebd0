"""The self-contained MLX model file of an export, for stock mlx-lm (`model_file` in
config.json, loaded with `trust_remote_code`).

There is one model definition: the file is built from the project's own sources (the config
they read, the cache layout, the G-SWA op with its Metal kernel source as a string, the MLX
model file), with the imports between them removed. They are read as data, never imported
(exporters do not import runtimes), and their bytes are part of the export store key.
The file has no `from __future__ import annotations`: mlx-lm executes it as a module that is
not in sys.modules, where dataclasses cannot resolve string annotations.
"""

from __future__ import annotations

import ast
import os

from plt_port.errors import PLTError

MODEL_FILE = "plt_mlx_model.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# in dependency order: each module only uses names of those above it
SOURCES = ("plt_port/errors.py", "plt_port/files.py", "plt_port/config.py",
           "plt_port/quantization.py", "plt_port/cache_layout.py", "metal_kernels/gswa.py",
           "runtimes/models/mlx_model.py")
KERNEL = "metal_kernels/gswa_decode.metal"
KERNEL_USER = "metal_kernels/gswa.py"  # reads KERNEL at import: the model file holds it as text
INLINED_PACKAGES = {path.split("/")[0] for path in SOURCES}  # their imports are dropped
HEADER = '''"""Parallel Loop Transformer for mlx-lm, written by `plt-port export mlx`: the project's
MLX model (runtimes/models/mlx_model.py) and what it uses, in one file that needs only mlx and numpy.
Generated; edit the sources, not this file."""
'''


class ModelFileError(PLTError, RuntimeError):
    """The project sources cannot be made into one model file (a source changed shape)."""


def source_paths() -> list[str]:
    """Every file whose bytes decide the model file."""
    return [os.path.join(ROOT, path) for path in (*SOURCES, KERNEL)]


def _is_project_import(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.level > 0 or node.module == "__future__"
                or node.module.split(".")[0] in INLINED_PACKAGES)
    return isinstance(node, ast.Import) and any(
        alias.name.split(".")[0] in INLINED_PACKAGES for alias in node.names)


def _defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def inline_module(path: str, replacements: dict[str, str]) -> tuple[str, ast.Module]:
    """The source of `path` without project and __future__ imports, and with each top-level
    assignment to a name of `replacements` replaced by that code."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    pending = set(replacements)
    for node in reversed(tree.body):
        target = node.targets[0].id if isinstance(node, ast.Assign) \
            and isinstance(node.targets[0], ast.Name) else None
        if _is_project_import(node) or target in pending:
            lines[node.lineno - 1:node.end_lineno] = [replacements[target] + "\n"] \
                if target in pending else []
            pending.discard(target)
    if pending:
        raise ModelFileError(f"{path}: no top-level assignment to {sorted(pending)}")
    return "".join(lines), tree


def model_file_source() -> str:
    with open(os.path.join(ROOT, KERNEL), encoding="utf-8") as f:
        kernel = f.read()
    parts, owners = [HEADER], {}
    for path in SOURCES:
        replacements = {"KERNEL_SOURCE": f"KERNEL_SOURCE = {kernel!r}"} \
            if path == KERNEL_USER else {}
        text, tree = inline_module(path, replacements)
        for name in _defined_names(tree):
            if name in owners:
                raise ModelFileError(f"{name} is defined in both {owners[name]} and {path}; "
                                     f"they cannot share one model file")
            owners[name] = path
        parts.append(f"\n# ---- {path} " + "-" * (80 - len(path)) + "\n" + text)
    return "".join(parts)
