"""The export store: exports made on first use (demo, bench, `--backend onnx|mlx` on a
PyTorch model dir).

An export is kept under `$PLT_PORT_CACHE` (default `~/.cache/plt-port`) in a folder keyed by
the source files (name, size, mtime), the export options and the code that decides an
export's bytes (the exporters, the checkpoint reader and config they build on, and the
sources inlined into the MLX model file), so a
changed model, option or exporter makes a new export and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable

from plt_port import checkpoint, config

from . import mlx_model_file


def export_root() -> str:
    return os.environ.get("PLT_PORT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "plt-port")


def code_digest() -> str:
    """Digest of the sources that decide an export's bytes: an export by other code is stale."""
    package = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(os.path.join(package, name) for name in os.listdir(package)
                     if name.endswith(".py"))
    digest = hashlib.sha256()
    for path in sorted({*sources, checkpoint.__file__, config.__file__,
                        *mlx_model_file.source_paths()}):
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    return digest.hexdigest()


def export_key(model_dir: str, target: str, options: dict) -> str:
    entries = []
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            stat = os.stat(path)
            entries.append((name, stat.st_size, stat.st_mtime_ns))
    blob = json.dumps([os.path.abspath(model_dir), target, sorted(options.items()), entries,
                       code_digest()], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_exported(model_dir: str, target: str, export: Callable[..., None],
                    **options) -> str:
    """Path of the stored `target` export of `model_dir`, running `export(model_dir, out_dir,
    **options)` (which must write atomically) when there is none yet."""
    out_dir = os.path.join(export_root(), "exports", target,
                           f"{os.path.basename(os.path.abspath(model_dir))}-"
                           f"{export_key(model_dir, target, options)}")
    if not os.path.isdir(out_dir):
        print(f"plt-port: exporting {model_dir} to {target} (first use) -> {out_dir}",
              file=sys.stderr, flush=True)
        export(model_dir, out_dir, **options)
    return out_dir
