"""`generation_config.json` of a model directory (Hugging Face's GenerationConfig file).

Read: the eos ids (they end generation, with those of config.json and the tokenizer) and the
sampling values that become the defaults of a generate request. As in Hugging Face,
`do_sample` false or absent means greedy, whatever temperature the file gives; the
repetition penalty applies either way. Other keys are ignored.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .errors import PLTError
from .files import read_json_object

FILE = "generation_config.json"


class GenerationConfigError(PLTError, ValueError):
    """A generation_config.json with a value of the wrong type."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: list[int] = field(default_factory=list)
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_dict(cls, data: dict, what: str = FILE) -> "GenerationConfig":
        def fail(name, expected):
            raise GenerationConfigError(f"{what} field '{name}': must be {expected}, got "
                                        f"{data[name]!r}")

        eos = data.get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(_is_int(i) and i >= 0 for i in eos):
            fail("eos_token_id", "a non-negative integer or a list of them")
        if not isinstance(data.get("do_sample", False), bool):
            fail("do_sample", "true or false")
        # the ranges of runtimes.sampling.SamplingParams, checked here to name the file
        for name, ok, expected in (
                ("top_k", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
                ("temperature", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
                ("top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
                ("min_p", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
                ("repetition_penalty", lambda v: _is_number(v) and v > 0, "a number > 0")):
            if data.get(name) is not None and not ok(data[name]):
                fail(name, expected + " or null")
        return cls(eos_token_ids=list(eos), do_sample=data.get("do_sample", False),
                   **{name: data.get(name) for name in ("temperature", "top_k", "top_p",
                                                        "min_p", "repetition_penalty")})

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "GenerationConfig":
        """The file of `model_dir`, or the empty config when it has none."""
        path = os.path.join(os.fspath(model_dir), FILE)
        if not os.path.exists(path):
            return cls()
        return cls.from_dict(read_json_object(path, GenerationConfigError), path)

    def sampling_defaults(self) -> dict:
        """The values given, as keyword arguments of runtimes.sampling.SamplingParams."""
        values = {"repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            values.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          min_p=self.min_p)
        else:
            values["temperature"] = 0.0
        return {name: value for name, value in values.items() if value is not None}
