"""Decode and prefill speed, and cache memory, across backends, loop counts, decode modes
and batch sizes.

Every backend is driven through the same contract (`runtimes.load_backend`): prefill a batch
of random prompts, then time single decode steps (after a warm-up) and report the median.
The steps of all loop counts, modes and batch sizes of a backend are interleaved, so the
ratios (clp vs naive, any loop count vs loops=1) come from one run under the same conditions.
Decode tok/s is the batch's: `batch` tokens per step.

With a JSON schema (`json_schema`, `plt-port bench --constrained` or `--json-schema FILE`) each
configuration runs twice instead, both picking every sequence's next token through its own
greedy `Sampler` inside the timed step: grammar "free" without a constraint, and "json" with
the schema's grammar (each sequence's constraint starts again whenever it completes, so every
step computes a real mask). `vs_free` (json step / free step) is the grammar's per-token
overhead; `sample_ms` (the median time a step spent sampling its rows, part of step_ms) and
`grammar_overhead` ((json sample_ms - free sample_ms) / free step_ms) measure it apart from
the noise of the model's step on a shared machine. The model's tokenizer is
used, or for a model without one (`--random`) a code vocabulary of its size
(`save_code_tokenizer`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from exporters.export_store import export_root
from plt_port.atomic import atomic_write_text
from plt_port.checkpoint import parameter_count
from plt_port.config import PLTConfig
from plt_port.errors import PLTError
from plt_port.random_model import PRESETS, RANDOM_BASE, save_code_tokenizer, save_random_model
from plt_port.files import parse_json
from plt_port.memory import FP32, check_fits
from plt_port.tokenizer import Tokenizer

from .backends import load_backend
from .sampling import Sampler

# the schema of `plt-port bench --constrained`: strings, integers and numbers with ranges, an
# enum, a nested array (a tool call's arguments)
BENCH_SCHEMA = {"type": "object", "properties": {
    "path": {"type": "string", "maxLength": 32},
    "line": {"type": "integer", "minimum": 1, "maximum": 99999},
    "mode": {"enum": ["read", "write", "append"]},
    "ranges": {"type": "array", "maxItems": 4, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "number", "minimum": 0,
                                                  "maximum": 1000}}},
    "force": {"type": "boolean"}},
    "required": ["path", "line", "mode", "ranges", "force"], "additionalProperties": False}

class BenchError(PLTError, ValueError):
    """A bench request that cannot run."""


@dataclass
class BenchSettings:
    backends: list[str] = field(default_factory=lambda: ["torch"])
    loops: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    modes: list[str] = field(default_factory=lambda: ["clp", "naive"])
    batches: list[int] = field(default_factory=lambda: [1])
    steps: int = 32
    prompt_len: int = 128
    warmup: int = 4
    seed: int = 0
    backend_options: dict[str, dict] = field(default_factory=dict)  # backend name -> options
    json_schema: dict | None = None  # a schema: "free" and "json" grammar rows (module doc)

    def __post_init__(self):
        checks = [("batch", b, 1) for b in self.batches] + [
            ("steps", self.steps, 1), ("prompt_len", self.prompt_len, 1),
            ("warmup", self.warmup, 0)]
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BenchError(f"{name.replace('_', '-')} must be an integer >= {low}, "
                                 f"got {value!r}")
        for name in ("backends", "loops", "modes", "batches"):
            if not getattr(self, name):
                raise BenchError(f"no {name} given")


def random_config(spec: str) -> tuple[str, PLTConfig]:
    """(name, config) from a preset name or `key=value,...` PLTConfig fields over "small"."""
    if spec in PRESETS:
        return spec, PLTConfig(**{**RANDOM_BASE, **PRESETS[spec]})
    fields = dict(PRESETS["small"])
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in PLTConfig.__dataclass_fields__ or key == "extra":
            raise BenchError(f"--random: expected a preset ({', '.join(PRESETS)}) or "
                             f"key=value config fields, got {item!r}")
        fields[key] = parse_json(value, f"--random: {key}={value!r}", BenchError)
    config = PLTConfig.from_dict({**RANDOM_BASE, **fields})
    digest = hashlib.sha256(config.to_json().encode()).hexdigest()[:8]
    return f"custom-{digest}", config


def with_window(config: PLTConfig, window: int) -> PLTConfig:
    """`config` with a local window of `window` keys (the query included)."""
    if config.is_v1:
        return config.replace(loop_window_size=window)
    return config.replace(plt_window_size=[window - 1, 0])


def random_model_dir(spec: str, root: str | None = None, window: int | None = None) -> str:
    """A random model of `spec` (with a local window of `window` keys when given: the same
    weights, the window is no tensor's shape), written once under the export store (so its
    ONNX and MLX exports are stored too) and reused."""
    name, config = random_config(spec)
    if window is not None:
        name, config = f"{name}-window{window}", with_window(config, window)
    # the tensors, and safetensors' serialised copy of them, are all in memory at once
    check_fits(2 * FP32 * parameter_count(config),
               f"--random {spec}: a model of {parameter_count(config):,} parameters")
    out_dir = os.path.join(root or os.path.join(export_root(), "random"), name)
    existing = os.path.join(out_dir, "config.json")
    if not os.path.exists(existing) or PLTConfig.from_file(existing) != config:
        save_random_model(out_dir, config, seed=0)
    return out_dir


@dataclass
class _Run:
    """One (backend, decode mode, batch size, grammar) configuration being timed."""

    backend: object
    mode: str
    batch: int
    state: object
    logits: np.ndarray
    prefill_s: float
    grammar_name: str | None = None   # None: plain argmax outside the timed step
    grammar: object = None            # the "json" runs' runtimes.grammar.Grammar
    samplers: list = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    sample_s: list[float] = field(default_factory=list)  # the sampling part of grammar runs

    def start_samplers(self) -> None:
        if self.grammar_name is not None:
            self.samplers = [Sampler(constraint=None if self.grammar is None
                                     else self.grammar.constraint())
                             for _ in range(self.batch)]

    def next_tokens(self) -> np.ndarray:
        """Each sequence's greedy next token: through its Sampler (and grammar), or argmax."""
        if self.grammar_name is None:
            return self.logits.argmax(-1)
        tokens = np.array([int(sampler(row[None])[0])
                           for sampler, row in zip(self.samplers, self.logits)])
        for sampler in self.samplers:
            if sampler.constraint is not None and sampler.constraint.is_terminated():
                sampler.constraint = self.grammar.constraint()
        return tokens


def bench_grammars(backend, settings: BenchSettings, model_dir: str) -> list[tuple]:
    """(grammar name, grammar) of each run of a configuration: one plain run, or with a
    schema the "free" and the "json" runs."""
    if settings.json_schema is None:
        return [(None, None)]
    from .grammar import compiler_for

    config = backend.config
    tokenizer = bench_tokenizer(model_dir, config.vocab_size)
    compiler = compiler_for(tokenizer, config.vocab_size,
                            set(tokenizer.eos_ids) | set(config.eos_token_ids))
    return [("free", None), ("json", compiler.json_schema(settings.json_schema))]


@functools.lru_cache(maxsize=4)  # one Tokenizer per model: its grammar vocabulary is built once
def bench_tokenizer(model_dir: str, vocab_size: int) -> Tokenizer:
    """The model's tokenizer, or a code vocabulary of its size (kept in the export store)."""
    if any(os.path.exists(os.path.join(model_dir, name))
           for name in ("tokenizer.model", "tokenizer.json")):
        return Tokenizer.from_dir(model_dir)
    out_dir = os.path.join(export_root(), "tokenizers", f"code-{vocab_size}")
    if not os.path.exists(os.path.join(out_dir, "tokenizer_config.json")):
        save_code_tokenizer(out_dir, vocab_size)
    return Tokenizer.from_dir(out_dir)


def time_backends(backends: list, settings: BenchSettings, progress: bool = False,
                  model_dir: str | None = None) -> list[dict]:
    """One row per (backend, decode mode actually run, batch size, grammar); a model without
    CLP runs naive only.

    Decode steps are interleaved: each round runs one step of every configuration, so a
    change of load on a shared machine hits all of them alike and the ratios stay fair.
    """
    runs = []
    capacity = settings.prompt_len + settings.warmup + settings.steps + 1
    for backend, batch in ((b, n) for b in backends for n in settings.batches):
        rng = np.random.default_rng(settings.seed)
        prompts = rng.integers(3, backend.config.vocab_size,
                               (batch, settings.prompt_len)).tolist()
        backend.prefill(prompts, capacity)  # warm-up (first-call allocations, lazy compiles)
        grammars = bench_grammars(backend, settings, model_dir)
        for mode in dict.fromkeys(backend.mode_run(m) for m in settings.modes):
            for grammar_name, grammar in grammars:
                start = time.perf_counter()
                state, logits = backend.prefill(prompts, capacity)
                run = _Run(backend, mode, batch, state, logits, time.perf_counter() - start,
                           grammar_name, grammar)
                run.start_samplers()
                runs.append(run)
    rounds = range(settings.warmup + settings.steps)
    for i in tqdm(rounds, desc=f"bench {backends[0].name}", disable=not progress):
        # every other round in reverse, so that no run always comes after the same one (a
        # step after a wide batch's finds the CPU caches cold)
        for run in runs if i % 2 == 0 else runs[::-1]:
            start = time.perf_counter()
            tokens = run.next_tokens()
            sampled = time.perf_counter()
            run.logits = run.backend.step(run.state, tokens, run.mode)
            if i >= settings.warmup:  # sampling is part of a step only where a Sampler runs
                run.step_s.append(time.perf_counter() -
                                  (sampled if run.grammar_name is None else start))
                run.sample_s.append(sampled - start)
    rows = []
    for run in runs:
        step_ms = statistics.median(run.step_s) * 1e3
        rows.append(dict(
            backend=run.backend.name, loops=run.backend.loops, mode=run.mode,
            batch=run.batch, grammar=run.grammar_name,
            sample_ms=statistics.median(run.sample_s) * 1e3 if run.grammar_name else None,
            prompt_len=settings.prompt_len,
            steps=settings.steps, prefill_tps=run.batch * settings.prompt_len / run.prefill_s,
            step_ms=step_ms, step_ms_min=min(run.step_s) * 1e3,
            step_ms_max=max(run.step_s) * 1e3, decode_tps=run.batch * 1e3 / step_ms,
            cache_bytes=run.backend.cache_bytes(run.state), capacity=run.state.capacity,
            peak_memory_bytes=run.backend.peak_memory_bytes()))
    return rows


def time_contexts(backends: list, contexts: list[int], settings: BenchSettings,
                  progress: bool = False) -> list[dict]:
    """Decode step latency at each context: a batch whose caches hold `context` positions.
    They are marked written without a prefill (zero K/V: a step costs the same whatever the
    values), so a 32k context takes no prefill time. Steps of every (backend, context, mode)
    are interleaved, as in `time_backends`."""
    runs = []
    for backend, context in ((b, c) for b in backends for c in contexts):
        capacity = context + settings.warmup + settings.steps + 1
        for mode in dict.fromkeys(backend.mode_run(m) for m in settings.modes):
            state = backend.empty_state(settings.batches[0], capacity)
            state.lengths[:] = context
            state.active[:] = True
            runs.append((backend, context, mode, state, []))
    tokens = np.full(settings.batches[0], 3, np.int64)
    for i in tqdm(range(settings.warmup + settings.steps), desc="bench contexts",
                  disable=not progress):
        for backend, _, mode, state, times in runs:
            start = time.perf_counter()
            backend.step(state, tokens, mode)
            if i >= settings.warmup:
                times.append(time.perf_counter() - start)
    return [dict(backend=backend.name, loops=backend.loops, mode=mode, context=context,
                 window=backend.config.window, batch=settings.batches[0],
                 step_ms=statistics.median(times) * 1e3,
                 cache_bytes=backend.cache_bytes(state))
            for backend, context, mode, state, times in runs]


def format_context_table(rows: list[dict]) -> str:
    """Step ms by context, one row per (backend, window, loops, mode), each context's step
    also as a ratio to the first context's."""
    contexts = sorted({r["context"] for r in rows})
    keys = list(dict.fromkeys((r["backend"], r["window"], r["loops"], r["mode"]) for r in rows))
    step = {(r["backend"], r["window"], r["loops"], r["mode"], r["context"]): r["step_ms"]
            for r in rows}
    lines = ["| backend | window | loops | mode | " + " | ".join(
        f"step ms @ {c:,}" for c in contexts) + " |", "|---" * (4 + len(contexts)) + "|"]
    for key in keys:
        cells = [f"{step[(*key, c)]:.2f} ({step[(*key, c)] / step[(*key, contexts[0])]:.2f}x)"
                 for c in contexts]
        lines.append(f"| {key[0]} | {key[1]:,} | {key[2]} | {key[3]} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def add_ratios(rows: list[dict]) -> None:
    """vs_naive: step latency / naive's (same backend, loops, batch and grammar); vs_loops1:
    / that of loops=1 (same backend, batch and grammar). A "json" grammar row against its
    "free" twin: vs_free = its step / the free step; grammar_overhead = (its sample_ms - the
    free sample_ms) / the free step, the grammar's share without the model step's noise."""
    by_key = {(r["backend"], r["loops"], r["mode"], r["batch"], r.get("grammar")): r
              for r in rows}
    for r in rows:
        naive = by_key.get((r["backend"], r["loops"], "naive", r["batch"], r.get("grammar")))
        single = by_key.get((r["backend"], 1, "naive", r["batch"], r.get("grammar")))
        free = by_key.get((r["backend"], r["loops"], r["mode"], r["batch"], "free")) \
            if r.get("grammar") == "json" else None
        r["vs_naive"] = r["step_ms"] / naive["step_ms"] if naive else None
        r["vs_loops1"] = r["step_ms"] / single["step_ms"] if single else None
        r["vs_free"] = r["step_ms"] / free["step_ms"] if free else None
        r["grammar_overhead"] = (r["sample_ms"] - free["sample_ms"]) / free["step_ms"] \
            if free else None


@dataclass
class _MLXLMState:
    cache: list
    capacity: int | None = None  # mlx-lm's caches grow in steps of their own


class MLXLMReference:
    """mlx-lm's own model class and prompt cache on the MLX backend's weights, stepped the way
    the bench steps a backend: how plt-port's MLX decode compares with stock mlx-lm. mlx-lm's
    `iquestloopcoder` runs v1 checkpoints at their trained loop count only."""

    name = "mlx-lm"

    def __init__(self, mlx_backend):
        from pathlib import Path

        from mlx_lm.utils import load_model

        if not mlx_backend.config.is_v1 or mlx_backend.loops != mlx_backend.config.num_loops:
            raise BenchError("--backend mlx-lm: mlx-lm's own model class runs v1 "
                             "(iquestloopcoder) checkpoints at their trained loop count only")
        self.model, _ = load_model(Path(mlx_backend.model_dir))
        self.config, self.loops = mlx_backend.config, mlx_backend.loops

    def mode_run(self, mode: str) -> str:
        return "naive"

    def prefill(self, prompts, capacity):
        from mlx_lm.models.cache import make_prompt_cache

        state = _MLXLMState(make_prompt_cache(self.model))
        return state, self._logits(prompts, state.cache)

    def step(self, state, tokens, mode):
        return self._logits(np.asarray(tokens)[:, None], state.cache)

    def _logits(self, ids, cache) -> np.ndarray:
        import mlx.core as mx

        logits = self.model(mx.array(np.asarray(ids, dtype=np.int32)), cache=cache)[:, -1]
        return np.array(logits.astype(mx.float32))

    def cache_bytes(self, state) -> int:
        return sum(c.nbytes for c in state.cache)

    def peak_memory_bytes(self):
        return None


def load_for_bench(name: str, model_dir: str, loops: int, options: dict):
    if name == MLXLMReference.name:
        if "kv_bits" in options:
            raise BenchError("--backend mlx-lm runs mlx-lm's own prompt cache: --kv-bits "
                             "applies to the torch and mlx backends")
        return MLXLMReference(load_backend("mlx", model_dir, loops=loops, **options))
    return load_backend(name, model_dir, loops=loops, **options)


def interleaved_groups(names: list[str]) -> list[list[str]]:
    """Backends timed together: each alone, except mlx-lm with mlx (their ratio is the point)."""
    groups = [[name] for name in names if name != MLXLMReference.name]
    if MLXLMReference.name in names:
        mlx = next((g for g in groups if g == ["mlx"]), None)
        (mlx if mlx is not None else groups).append(
            MLXLMReference.name if mlx is not None else [MLXLMReference.name])
    return groups


def run_bench(model_dir: str, settings: BenchSettings, progress: bool = True) -> dict:
    rows = []
    for names in interleaved_groups(settings.backends):
        # every loop count of a group is loaded at once so that their steps interleave
        backends = [load_for_bench(name, model_dir, loops, settings.backend_options.get(name, {}))
                    for name in names for loops in settings.loops]
        rows += time_backends(backends, settings, progress, model_dir)
        del backends
    add_ratios(rows)
    config = PLTConfig.from_file(model_dir)
    return dict(
        model_dir=os.path.abspath(model_dir),
        model=dict(model_type=config.model_type, parameters=parameter_count(config),
                   hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                   num_attention_heads=config.num_attention_heads,
                   num_key_value_heads=config.num_key_value_heads,
                   intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
                   window=config.window, trained_loops=config.num_loops),
        settings=asdict(settings),
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpu_count=os.cpu_count()),
        rows=rows)


def format_table(result: dict) -> str:
    model = result["model"]
    settings = result["settings"]
    lines = [f"model: {result['model_dir']} ({model['parameters'] / 1e6:.1f}M parameters, "
             f"{model['num_hidden_layers']} layers, d={model['hidden_size']}, "
             f"window={model['window']})",
             f"prompt_len={settings['prompt_len']} "
             f"steps={settings['steps']} (median step latency after {settings['warmup']} "
             f"warm-up steps)", ""]
    grammar = any(r.get("grammar") for r in result["rows"])
    header = ["backend", "loops", "mode", "batch"] + ["grammar"] * grammar + [
        "prefill tok/s", "step ms"] + ["sample ms"] * grammar + [
        "decode tok/s", "vs naive", "vs loops=1"] + ["vs free", "grammar +"] * grammar + [
        "cache MiB"]
    table = [header]

    def ratio(value):
        return "-" if value is None else f"{value:.2f}x"

    def percent(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    for r in result["rows"]:
        table.append([r["backend"], str(r["loops"]), r["mode"], str(r["batch"])]
                     + [r.get("grammar") or "-"] * grammar
                     + [f"{r['prefill_tps']:.0f}", f"{r['step_ms']:.2f}"]
                     + [f"{r['sample_ms']:.3f}" if r.get("sample_ms") is not None else "-"]
                     * grammar
                     + [f"{r['decode_tps']:.1f}", ratio(r["vs_naive"]), ratio(r["vs_loops1"])]
                     + [ratio(r.get("vs_free")), percent(r.get("grammar_overhead"))] * grammar
                     + [f"{r['cache_bytes'] / 2**20:.3f}"])
    return "\n".join(lines + aligned_table(table))


def aligned_table(table: list[list[str]]) -> list[str]:
    """The lines of a table (its first row the header) with right-aligned columns."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    table = [table[0], ["-" * w for w in widths], *table[1:]]
    return ["| " + " | ".join(cell.rjust(w) for cell, w in zip(row, widths)) + " |"
            for row in table]


def write_json(result: dict, path: str) -> None:
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
