"""Backends behind one contract (`runtimes.backends.base.Backend`) and the table that loads them.

Backends are imported only when asked for, so a missing framework only disables its backend.
"""

from __future__ import annotations

import importlib
import inspect

from .base import Backend, BackendError, DecodeState

# name -> (module, class, what must be importable, install hint)
BACKENDS = {
    "torch": ("runtimes.backends.torch_backend", "TorchBackend", "torch", "pip install 'plt-port[torch]'"),
    "mlx": ("runtimes.backends.mlx_backend", "MLXBackend", "mlx.core", "pip install 'plt-port[mlx]'"),
    "onnx": ("runtimes.backends.onnx_backend", "ONNXBackend", "onnxruntime", "pip install 'plt-port[onnx]'"),
}


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


def load_backend(name: str, model_dir: str, loops: int | None = None, **options) -> Backend:
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


__all__ = ["BACKENDS", "Backend", "BackendError", "DecodeState", "available_backends",
           "backend_unavailable_reason", "load_backend"]
