"""The embedded model families, one model per loop count, trained by `plt-port train`:
plt-stdlib (the default, on the Python standard library; MODEL_CARD.md in this folder) and
plt-chains (on the variable-chain task of plt_port.tasks, where depth matters;
MODEL_CARD_CHAINS.md).
"""

from __future__ import annotations

import os

from ..errors import PLTError

FAMILY_DIR = os.path.dirname(os.path.abspath(__file__))
FAMILY = ("plt-stdlib-L1", "plt-stdlib-L2", "plt-stdlib-L3", "plt-stdlib-L4")
CHAINS_FAMILY = ("plt-chains-L1", "plt-chains-L2", "plt-chains-L3", "plt-chains-L4")
FAMILIES = {"stdlib": FAMILY, "chains": CHAINS_FAMILY}
DEFAULT_MODEL = "plt-stdlib-L2"  # two loops, like the released LoopCoder-v2
MODEL_CARD = os.path.join(FAMILY_DIR, "MODEL_CARD.md")
CHAINS_MODEL_CARD = os.path.join(FAMILY_DIR, "MODEL_CARD_CHAINS.md")
CHAINS_ACCURACY_JSON = os.path.join(FAMILY_DIR, "chains_accuracy.json")  # its eval rows as data
CHAINS_EXAMPLES_JSON = os.path.join(FAMILY_DIR, "chains_examples.json")  # the demo's examples
HELDOUT_JSON = os.path.join(FAMILY_DIR, "heldout.json")  # the card's held-out rows as data


class ModelNotFoundError(PLTError, FileNotFoundError):
    pass


def model_dir(name: str) -> str:
    """Directory of the family model `name` (must be present)."""
    corpus = next((c for c, names in FAMILIES.items() if name in names), None)
    if corpus is None:
        raise ModelNotFoundError(f"unknown family model {name!r}; the families are "
                                 f"{', '.join(FAMILY + CHAINS_FAMILY)}")
    path = os.path.join(FAMILY_DIR, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        card = os.path.basename(MODEL_CARD if corpus == "stdlib" else CHAINS_MODEL_CARD)
        raise ModelNotFoundError(
            f"the embedded model {name} is not in {FAMILY_DIR}; train it with "
            f"`plt-port train --out runs/{corpus}-family --corpus {corpus} --loops 1 2 3 4 "
            f"--threads 1 --ship-dir {FAMILY_DIR}` and the recipe of {card}, or pass --model DIR")
    return path


def resolve_model_dir(model: str) -> str:
    """A model the user names: a shipped model's name (`plt-stdlib-L3`, when no directory
    has that name) as its directory, anything else as it is."""
    if model in FAMILY + CHAINS_FAMILY and not os.path.isdir(model):
        return model_dir(model)
    return model


def family_model_dirs(corpus: str = "stdlib") -> dict[str, str]:
    """{name: directory} of the models of family `corpus` that are present, in loop order."""
    return {name: os.path.join(FAMILY_DIR, name) for name in FAMILIES[corpus]
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
