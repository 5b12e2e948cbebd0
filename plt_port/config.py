"""`config.json` of PLT checkpoints: `iquestpltcoder` (native) and `iquestloopcoder` (v1).

Field names and defaults follow SPEC section 5. Keys this class does not know are kept in
`extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import PLTError
from .files import read_json_object

PLT_TYPE = "iquestpltcoder"
V1_TYPE = "iquestloopcoder"
ARCHITECTURES = {PLT_TYPE: "IQuestPLTCoderForCausalLM", V1_TYPE: "IQuestLoopCoderForCausalLM"}
MAX_LOOPS = 8
# Far beyond any released model (80 layers, 131,072 positions, 76,800 tokens for the 40B):
# larger values are typos or hostile, and would only reach the allocator.
MAX_LAYERS = 1024
MAX_DIM = 2**24


class ConfigError(PLTError, ValueError):
    """A config.json that cannot describe a model this project runs."""


@dataclass
class PLTConfig:
    model_type: str = PLT_TYPE
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int = 688
    vocab_size: int = 4096
    max_position_embeddings: int = 2048
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str = "float32"
    architectures: list[str] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict | None = None
    # PLT (iquestpltcoder)
    plt_num_loops: int = 2
    plt_window_size: list[int] = field(default_factory=lambda: [64, 0])
    plt_normalize_per_loop: bool = True
    plt_emb_scale: float | None = None
    plt_hidden_scale: float | None = None
    plt_gate_use_hidden_states: bool = False
    # LoopCoder v1 (iquestloopcoder)
    loop_num: int = 2
    loop_window_size: int = 64
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.check_types()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.architectures is None:
            self.architectures = [ARCHITECTURES.get(self.model_type, "")]
        self.plt_window_size = list(self.plt_window_size)
        self.validate()

    # ---- derived views used by every backend -------------------------------------------
    @property
    def is_v1(self) -> bool:
        return self.model_type == V1_TYPE

    @property
    def num_loops(self) -> int:
        """Loop count the checkpoint was trained with (the inference default)."""
        return self.loop_num if self.is_v1 else self.plt_num_loops

    @property
    def window(self) -> int:
        """Keys a loop >= 2 query sees in its local branch, the query itself included.

        Never more than max_position_embeddings: a wider window sees the same keys, and the
        ring caches are allocated at this size."""
        window = self.loop_window_size if self.is_v1 else self.plt_window_size[0] + 1
        return min(window, self.max_position_embeddings)

    @property
    def emb_scale(self) -> float:
        return 1.0 if self.plt_emb_scale is None else float(self.plt_emb_scale)

    @property
    def hidden_scale(self) -> float:
        return 1.0 if self.plt_hidden_scale is None else float(self.plt_hidden_scale)

    @property
    def gate_uses_hidden(self) -> bool:
        """True: gate from RMSNorm_g(block input) ([H, d] weight); False: from the query ([H, D])."""
        return not self.is_v1 and self.plt_gate_use_hidden_states

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def resolve_loops(self, loops: int | None) -> int:
        """The inference loop count: `loops` if given, else the checkpoint's."""
        if loops is None:
            return self.num_loops
        if isinstance(loops, bool) or not isinstance(loops, int) or not 1 <= loops <= MAX_LOOPS:
            raise ConfigError(f"loops: must be an integer in 1..{MAX_LOOPS}, got {loops!r}")
        return loops

    # ---- validation --------------------------------------------------------------------
    def check_types(self) -> None:
        """JSON types of the fields, checked before any arithmetic on them."""
        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        ints = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings"]
        bools = ["tie_word_embeddings", "attention_bias", "mlp_bias"]
        optional_numbers = []
        if self.model_type == V1_TYPE:
            ints += ["loop_num", "loop_window_size"]
        else:
            ints.append("plt_num_loops")
            bools += ["plt_normalize_per_loop", "plt_gate_use_hidden_states"]
            optional_numbers += ["plt_emb_scale", "plt_hidden_scale"]
            window = self.plt_window_size
            if not isinstance(window, (list, tuple)) or len(window) != 2 \
                    or not all(is_int(w) for w in window):
                raise ConfigError(f"config.json field 'plt_window_size': must be [left, right] "
                                  f"integers, got {window!r}")
        checks = [(ints, is_int, "an integer"), (bools, lambda v: isinstance(v, bool), "true or false"),
                  (optional_numbers, lambda v: v is None or is_number(v), "a number or null"),
                  (["head_dim"], lambda v: v is None or is_int(v), "an integer")]
        for names, ok, what in checks:
            for name in names:
                if not ok(getattr(self, name)):
                    raise ConfigError(f"config.json field '{name}': must be {what}, "
                                      f"got {getattr(self, name)!r}")

    def validate(self) -> None:
        def fail(name, why):
            raise ConfigError(f"config.json field '{name}': {why}")

        def is_finite(number):  # JSON integers may be too large for a float
            try:
                return math.isfinite(number)
            except OverflowError:
                return False

        if self.model_type not in ARCHITECTURES:
            fail("model_type", f"expected one of {sorted(ARCHITECTURES)}, got {self.model_type!r}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "vocab_size",
                     "max_position_embeddings", "head_dim"):
            limit = MAX_LAYERS if name == "num_hidden_layers" else MAX_DIM
            if not 1 <= getattr(self, name) <= limit:
                fail(name, f"must be an integer in 1..{limit}, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads",
                 f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads",
                 f"{self.num_key_value_heads} KV heads do not divide "
                 f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            fail("head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not is_finite(value):
                fail(name, f"must be a positive finite number, got {value!r}")
        for name in ("attention_bias", "mlp_bias"):
            if getattr(self, name):
                fail(name, "biases in attention/MLP projections are not implemented (every "
                           "released checkpoint has false)")
        if self.rope_scaling is not None:
            fail("rope_scaling", f"RoPE scaling is not implemented, got {self.rope_scaling!r}")
        for tok in [self.bos_token_id, *self.eos_token_ids]:
            if tok is not None and not (isinstance(tok, int) and 0 <= tok):
                fail("bos_token_id/eos_token_id", f"token ids must be non-negative ints, got {tok!r}")
        if self.is_v1:
            if not 1 <= self.loop_num <= MAX_LOOPS:
                fail("loop_num", f"must be in 1..{MAX_LOOPS}, got {self.loop_num!r}")
            if self.loop_window_size < 1:
                fail("loop_window_size", f"must be >= 1 (keys incl. the query), got "
                                         f"{self.loop_window_size!r}")
            return
        for name in ("plt_emb_scale", "plt_hidden_scale"):
            value = getattr(self, name)
            if value is not None and not is_finite(value):
                fail(name, f"must be a finite number or null, got {value!r}")
        if not 1 <= self.plt_num_loops <= MAX_LOOPS:
            fail("plt_num_loops", f"must be an integer in 1..{MAX_LOOPS}, got {self.plt_num_loops!r}")
        window = self.plt_window_size
        if window[1] != 0:
            fail("plt_window_size", f"right must be 0 for a causal model, got {window!r}")
        if window[0] < 0:
            fail("plt_window_size", f"left must be >= 0, got {window!r}")

    # ---- (de)serialisation ------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PLTConfig":
        if "model_type" not in data:
            raise ConfigError("config.json field 'model_type': missing")
        other_format = "plt_" if data["model_type"] == V1_TYPE else "loop_"
        known = {f.name for f in dataclasses.fields(cls)
                 if f.name != "extra" and not f.name.startswith(other_format)}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as exc:  # e.g. an arithmetic check on a string field
            raise ConfigError(f"config.json: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PLTConfig":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such model directory (no config.json)")
        if os.path.isdir(path):
            if not os.path.exists(os.path.join(path, "config.json")):
                raise ConfigError(f"{path}: no config.json")
            path = os.path.join(path, "config.json")
        return cls.from_dict(read_json_object(path, ConfigError))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        other_format = "plt_" if self.is_v1 else "loop_"
        data = {k: v for k, v in data.items() if not k.startswith(other_format)}
        data.update(self.extra)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes) -> "PLTConfig":
        return dataclasses.replace(self, **changes)


def canonical_name(name: str) -> str:
    """Accepted tensor-name aliases -> the names of checkpoint.expected_shapes (SPEC section
    5: loop_gate_proj == plt_gate)."""
    return name.replace(".self_attn.loop_gate_proj.", ".self_attn.plt_gate.")
