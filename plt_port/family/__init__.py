"""The embedded default model family: small PLT code models trained by `plt-port train`
on the Python standard library, one per loop count (see MODEL_CARD.md in this folder).
"""

from __future__ import annotations

import os

from ..errors import PLTError

FAMILY_DIR = os.path.dirname(os.path.abspath(__file__))
FAMILY = ("plt-stdlib-L1", "plt-stdlib-L2", "plt-stdlib-L3", "plt-stdlib-L4")
DEFAULT_MODEL = "plt-stdlib-L2"  # two loops, like the released LoopCoder-v2
MODEL_CARD = os.path.join(FAMILY_DIR, "MODEL_CARD.md")
HELDOUT_JSON = os.path.join(FAMILY_DIR, "heldout.json")  # the card's held-out rows as data


class ModelNotFoundError(PLTError, FileNotFoundError):
    pass


def model_dir(name: str) -> str:
    """Directory of the family model `name` (must be present)."""
    if name not in FAMILY:
        raise ModelNotFoundError(f"unknown family model {name!r}; the family is {', '.join(FAMILY)}")
    path = os.path.join(FAMILY_DIR, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelNotFoundError(
            f"the embedded model {name} is not in {FAMILY_DIR}; train it with "
            f"`plt-port train --out runs/stdlib-family --loops 1 2 3 4 --threads 1 "
            f"--ship-dir {FAMILY_DIR}` (see MODEL_CARD.md), or pass --model DIR")
    return path


def family_model_dirs() -> dict[str, str]:
    """{name: directory} of the family models that are present, in loop order."""
    return {name: os.path.join(FAMILY_DIR, name) for name in FAMILY
            if os.path.exists(os.path.join(FAMILY_DIR, name, "config.json"))}


def default_model_dir() -> str:
    """The two-loop model: the default of the CLI, the demo and the tests."""
    return model_dir(DEFAULT_MODEL)


def display_names(model_dirs) -> dict[str, str]:
    """{display name: model dir}: directory names, made unique with a counter."""
    names: dict[str, str] = {}
    for path in model_dirs:
        base = os.path.basename(os.path.normpath(path)) or "model"
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names[name] = str(path)
    return names
