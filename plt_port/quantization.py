"""mlx-lm's affine weight quantization, as a checkpoint format (framework-free).

config.json's `quantization` entry (or the `quantization_config` copy some exports carry
alone) gives the default {group_size, bits, mode} and, keyed by module path, per-module
overrides: a dict of its own parameters, or `false` for a module kept unquantized. A
quantized module stores `weight` (uint32, `bits` values packed per 32 bits: [out, in * bits
/ 32]), `scales` and `biases` ([out, in / group_size], the float dtype of the export); as
in mlx-lm, a module is quantized exactly when its `scales` tensor is present.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import PLTError

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
PARAMETER_KEYS = ("group_size", "bits", "mode")


# The weights mlx-lm quantizes: those of nn.Linear (`*_proj`, `lm_head`) and nn.Embedding.
QUANTIZABLE_SUFFIXES = ("_proj.weight", "lm_head.weight", "embed_tokens.weight")


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    return name.endswith(QUANTIZABLE_SUFFIXES) and shape[-1] % group_size == 0


class QuantizationError(PLTError, ValueError):
    """A quantization entry or quantized tensor this project cannot load."""


@dataclass(frozen=True)
class QuantParams:
    group_size: int
    bits: int
    mode: str = "affine"

    def as_dict(self) -> dict:
        return asdict(self)

    def packed_shapes(self, shape: tuple[int, ...], module: str) -> dict[str, tuple[int, ...]]:
        """Shapes of `module`'s weight/scales/biases when its float weight has `shape`."""
        *outer, inputs = shape
        if inputs % self.group_size:
            raise QuantizationError(f"{module}: group size {self.group_size} does not divide "
                                    f"its input size {inputs}")
        groups = (*outer, inputs // self.group_size)
        return {f"{module}.weight": (*outer, inputs * self.bits // 32),
                f"{module}.scales": groups, f"{module}.biases": groups}

    def nbytes(self, shape: tuple[int, ...], scale_itemsize: int = 2) -> int:
        """Bytes of a quantized weight of float `shape`, scales and biases included."""
        values = math.prod(shape)
        return values * self.bits // 8 + 2 * (values // self.group_size) * scale_itemsize


def parse_params(entry, where: str) -> QuantParams:
    if not isinstance(entry, dict):
        raise QuantizationError(f"config.json {where}: expected an object with group_size and "
                                f"bits, got {entry!r}")
    mode = entry.get("mode", "affine")
    if mode != "affine":
        raise QuantizationError(f"config.json {where}: quantization mode {mode!r} is not "
                                f"supported (only mlx-lm's 'affine')")
    bits, group_size = entry.get("bits"), entry.get("group_size")
    # integers only: 4.0 equals 4 but breaks the packing arithmetic of the loaders
    if type(bits) is not int or bits not in AFFINE_BITS:
        raise QuantizationError(f"config.json {where}: bits must be one of {AFFINE_BITS}, "
                                f"got {bits!r}")
    if type(group_size) is not int or group_size not in GROUP_SIZES:
        raise QuantizationError(f"config.json {where}: group_size must be one of "
                                f"{GROUP_SIZES}, got {group_size!r}")
    return QuantParams(group_size, bits, mode)


@dataclass(frozen=True)
class Quantization:
    default: QuantParams
    per_module: dict  # module path -> QuantParams, or None: kept unquantized

    @classmethod
    def from_config(cls, config: dict) -> "Quantization | None":
        """From config.json's entries (PLTConfig keeps them in `extra`); None: no entry."""
        key = "quantization" if "quantization" in config else "quantization_config"
        entry = config.get(key)
        if entry is None:
            return None
        if isinstance(entry, dict) and "quant_method" in entry:
            raise QuantizationError(f"config.json {key}: quant_method "
                                    f"{entry['quant_method']!r} is not supported (only "
                                    f"mlx-lm's affine quantization)")
        default = parse_params(entry, key)
        per_module = {}
        for path, value in entry.items():
            if path in PARAMETER_KEYS:
                continue
            if value is False:
                per_module[path] = None
            elif value is True:
                per_module[path] = default
            else:
                per_module[path] = parse_params(value, f"{key}[{path!r}]")
        return cls(default, per_module)

    def plan(self, expected: dict[str, tuple], present: set[str]) -> dict[str, QuantParams]:
        """The quantized modules among `expected` (float shapes) with their parameters: those
        whose `scales` are `present`, as mlx-lm decides."""
        modules = {}
        for name in expected:
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and f"{module}.scales" in present:
                params = self.per_module.get(module, self.default)
                if params is None:
                    raise QuantizationError(f"{module}: config.json keeps it unquantized "
                                            f"(false), but {module}.scales is present")
                modules[module] = params
        return modules


PACKED_DTYPE = "uint32"
SCALE_DTYPES = ("float16", "bfloat16", "float32")


def check_packed_dtypes(modules: dict[str, QuantParams], dtypes: dict[str, str]) -> None:
    """The quantized modules' tensors must have mlx-lm's dtypes (`dtypes`: name -> dtype
    name): packed weights uint32, scales and biases a float type; other integer types would
    fail at the first token, integer scales decode garbage."""
    for module in modules:
        wanted = {f"{module}.weight": (PACKED_DTYPE,), f"{module}.scales": SCALE_DTYPES,
                  f"{module}.biases": SCALE_DTYPES}
        for name, allowed in wanted.items():
            if name in dtypes and dtypes[name] not in allowed:
                raise QuantizationError(f"{name} is {dtypes[name]}: a quantized module's "
                                        f"tensor must be {' or '.join(allowed)}")


def quantized_shapes(expected: dict[str, tuple], modules: dict[str, QuantParams]) -> dict:
    """`expected` with each quantized module's weight replaced by its packed tensors."""
    shapes = dict(expected)
    for module, params in modules.items():
        shapes.update(params.packed_shapes(expected[f"{module}.weight"], module))
    return shapes
