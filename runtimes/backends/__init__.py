"""Backends behind one contract (`runtimes.backends.base.Backend`) and the table that loads them.

Backends are imported only when asked for, so a missing framework only disables its backend.
A model directory says which backends run it (`model_kind`, `detect_backend`): a PyTorch
checkpoint runs on every backend (ONNX and MLX export it on first use), an export only on
its own; `load_backend` refuses a backend that does not fit in one line naming the one that does.
"""

from __future__ import annotations

import importlib
import inspect
import os

from exporters.mlx_export import MARKER as MLX_EXPORT_MARKER
from exporters.onnx_export import MANIFEST as ONNX_MANIFEST
from plt_port.files import FileError, read_json_object

from .base import Backend, BackendError, DecodeState

# name -> (module, class, what must be importable, install hint)
BACKENDS = {
    "torch": ("runtimes.backends.torch_backend", "TorchBackend", "torch", "pip install 'plt-port[torch]'"),
    "mlx": ("runtimes.backends.mlx_backend", "MLXBackend", "mlx.core", "pip install 'plt-port[mlx]'"),
    "onnx": ("runtimes.backends.onnx_backend", "ONNXBackend", "onnxruntime", "pip install 'plt-port[onnx]'"),
}


# what a model directory is -> (how to say it, the backends that run it; the first is detected)
MODEL_KINDS = {
    "pytorch": ("a PyTorch checkpoint", ("torch", "onnx", "mlx")),
    "onnx": (f"an ONNX export ({ONNX_MANIFEST})", ("onnx",)),
    "mlx": (f"an MLX export (config.json has {MLX_EXPORT_MARKER!r})", ("mlx",)),
    "mlx-quantized": ("an mlx-lm quantized checkpoint (config.json has 'quantization')", ("mlx",)),
}


def model_kind(model_dir: str) -> str:
    """The key of MODEL_KINDS that `model_dir` is. A directory whose config.json cannot be
    read counts as a PyTorch checkpoint: loading it says what is wrong with it."""
    if os.path.isfile(os.path.join(model_dir, ONNX_MANIFEST)):
        return "onnx"
    try:
        config = read_json_object(os.path.join(model_dir, "config.json"))
    except FileError:
        return "pytorch"
    if MLX_EXPORT_MARKER in config:
        return "mlx"
    if "quantization" in config or "quantization_config" in config:
        return "mlx-quantized"
    return "pytorch"


def detect_backend(model_dir: str) -> str:
    """The backend a model directory is for (torch for a PyTorch checkpoint)."""
    return MODEL_KINDS[model_kind(model_dir)][1][0]


def check_backend_fits(name: str, model_dir: str) -> None:
    """One line when backend `name` cannot load `model_dir`, naming the backend that can."""
    what, backends = MODEL_KINDS[model_kind(model_dir)]
    if name in BACKENDS and name not in backends:
        raise BackendError(f"{model_dir} is {what}, which the {name} backend does not load: "
                           f"use --backend {backends[0]}")


def backend_unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run here, else a sentence saying why not. Only a missing
    framework makes a backend unavailable: an error in the backend's own module is a bug and
    is raised by `load_backend`, never reported as "not installed"."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}"
    _, _, requirement, hint = BACKENDS[name]
    try:
        importlib.import_module(requirement)
    except ImportError as exc:
        return f"backend {name!r} is not available ({exc}); install it with: {hint}"
    return None


def available_backends() -> list[str]:
    return [name for name in BACKENDS if backend_unavailable_reason(name) is None]


def load_backend(name: str | None, model_dir: str, loops: int | None = None,
                 **options) -> Backend:
    """Backend `name` (None: the one `model_dir` is for) with `model_dir` loaded."""
    model_dir = os.fspath(model_dir)
    name = detect_backend(model_dir) if name is None else name
    check_backend_fits(name, model_dir)
    reason = backend_unavailable_reason(name)
    if reason:
        raise BackendError(reason)
    module, cls_name, _, _ = BACKENDS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    known = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ("self", "model_dir", "loops")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise BackendError(f"{name} backend: unknown options {unknown} (known: {', '.join(known)})")
    return cls(model_dir, loops=loops, **options)


__all__ = ["BACKENDS", "MODEL_KINDS", "Backend", "BackendError", "DecodeState",
           "available_backends", "backend_unavailable_reason", "check_backend_fits",
           "detect_backend", "load_backend", "model_kind"]
