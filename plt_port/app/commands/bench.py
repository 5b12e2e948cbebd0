"""plt-port bench [--model DIR | --random PRESET|key=value,...] [--backend torch,onnx,mlx]

Decode step latency (median) and tok/s for each loop count, decode mode and batch size,
prefill tok/s and cache bytes; prints a table and optionally writes the rows as JSON.
"""

from __future__ import annotations

import argparse

from plt_port.app.cli import model_path
from plt_port.errors import PLTError

from .generate import add_backend_arguments, add_speculative_arguments, backend_options


def comma_list(kind):
    def parse(text: str):
        try:
            values = [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values

    return parse


def add_arguments(parser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-m", "--model", metavar="DIR|NAME", type=model_path,
                        help="PyTorch PLT model directory or shipped model name")
    source.add_argument("--random", metavar="SIZE",
                        help="random PLT model: a preset (tiny, small ~5M, 25m, 100m ~100M, 300m "
                             "~340M parameters) or config fields, e.g. "
                             "hidden_size=512,num_hidden_layers=8 (over 'small'); default small")
    parser.add_argument("--backend", type=comma_list(str), default=["torch"],
                        help="backends, comma-separated (default torch); mlx-lm: stock "
                             "mlx-lm's model class on the MLX weights (v1 checkpoints)")
    parser.add_argument("--loops", type=comma_list(int), default=[1, 2, 3, 4],
                        help="inference loop counts (default 1,2,3,4)")
    parser.add_argument("--modes", type=comma_list(str), default=["clp", "naive"],
                        help="decode modes (default clp,naive)")
    parser.add_argument("--batch", type=comma_list(int), default=[1],
                        help="sequences per step, comma-separated, e.g. 1,4,16 (default 1)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps (default 32)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    grammar = parser.add_mutually_exclusive_group()
    grammar.add_argument("--constrained", action="store_true",
                         help="also time grammar-constrained decoding: each configuration as "
                              "'free' and 'json' rows, every sequence sampled in the step, "
                              "'vs free' the grammar's overhead (schema: "
                              "runtimes.benchmark.BENCH_SCHEMA)")
    grammar.add_argument("--json-schema", metavar="FILE",
                         help="as --constrained, with the JSON schema in FILE")
    parser.add_argument("--contexts", type=comma_list(int), default=None, metavar="N,...",
                        help="instead: decode step time with caches holding N positions "
                             "(marked written, no prefill), e.g. 1024,8192,32768, at the "
                             "first --batch")
    parser.add_argument("--windows", type=comma_list(int), default=None, metavar="W,...",
                        help="with --contexts and --random: the same random model at each "
                             "local window of W keys, timed together (e.g. 64,8192)")
    parser.add_argument("--rewind", action="store_true",
                        help="instead: what rewinding a sequence costs (SPEC section 4): undo "
                             "of the journal, a snapshot restore, the prefills a snapshot or "
                             "an exact recompute runs again, the journal's cost per decode "
                             "step, at each --contexts (default 1024) and --windows")
    parser.add_argument("--chat-turns", type=int, default=None, metavar="N",
                        help="instead: time to first token of each of N turns of a chat re-sent "
                             "whole every turn, prompt cache on and off (--system-tokens, then "
                             "30 tokens a turn and a 16-token greedy answer)")
    parser.add_argument("--system-tokens", type=int, default=2000,
                        help="with --chat-turns: the system prompt's tokens (default 2000)")
    parser.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                        help="onnx and mlx backends: weight-only quantization of an export "
                             "made on first use (onnx: MatMulNBits, block 32, accuracy level 4; "
                             "mlx: affine, group 64)")
    add_backend_arguments(parser)
    add_speculative_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, metavar="N",
                        help="with --speculative: greedy answers timed plain and speculative, "
                             "N of each in turn (default 3; --steps: the answer's tokens)")


def quantize_option(name: str, args) -> dict:
    if args.quantize is None:
        return {}
    if name not in ("onnx", "mlx"):
        raise PLTError(f"--quantize: the {name} backend does not quantize (onnx and mlx do)")
    return {"quantize": args.quantize}


def mlx_weights(name: str) -> str:
    """The backend whose options a bench backend takes: mlx-lm runs on the MLX export."""
    return "mlx" if name == "mlx-lm" else name


def run(args):
    from plt_port.files import read_json_object
    from runtimes.backends.base import DECODE_MODES
    from runtimes.benchmark import BENCH_SCHEMA, BenchError, BenchSettings, format_table, \
        random_model_dir, run_bench, write_json

    bad_modes = [m for m in args.modes if m not in DECODE_MODES]
    if bad_modes:
        raise BenchError(f"--modes: unknown {bad_modes}; choose from {', '.join(DECODE_MODES)}")
    settings = BenchSettings(
        backends=args.backend, loops=args.loops, modes=args.modes, batches=args.batch,
        steps=args.steps, prompt_len=args.prompt_len, warmup=args.warmup, seed=args.seed,
        json_schema=read_json_object(args.json_schema, BenchError) if args.json_schema
        else BENCH_SCHEMA if args.constrained else None,
        backend_options={name: {**backend_options(mlx_weights(name), args),
                                **quantize_option(mlx_weights(name), args)}
                         for name in args.backend})
    if args.speculative != "off":
        return run_speculative(args, settings)
    if args.rewind:
        return run_rewind(args, settings)
    if args.chat_turns is not None:
        return run_chat_turns(args, settings)
    if args.contexts is not None:
        return run_contexts(args, settings)
    if args.windows is not None:
        raise BenchError("--windows goes with --contexts")
    model_dir = args.model or random_model_dir(args.random or "small")
    result = run_bench(model_dir, settings)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def run_contexts(args, settings) -> int:
    """`--contexts`: step time by context, for each loop count, mode and --windows model."""
    from dataclasses import asdict

    from runtimes.benchmark import format_context_table, time_contexts, write_json

    model_dirs, backends = window_backends(args, settings)
    rows = time_contexts(backends, args.contexts, settings, progress=True)
    print(format_context_table(rows))
    if args.json:
        write_json({"settings": asdict(settings), "contexts": args.contexts,
                    "model_dirs": model_dirs, "rows": rows}, args.json)
        print(f"wrote {args.json}")
    return 0


def window_backends(args, settings) -> tuple[list[str], list]:
    """(model dirs, backends): --model, or a --random model at each of --windows, at every
    backend and loop count asked."""
    from runtimes.benchmark import BenchError, load_for_bench, random_model_dir

    if args.windows is not None and args.model is not None:
        raise BenchError("--windows makes random models: give --random, not --model")
    model_dirs = [args.model] if args.model else [
        random_model_dir(args.random or "small", window=window)
        for window in (args.windows or [None])]
    return model_dirs, [load_for_bench(name, model_dir, loops,
                                       settings.backend_options.get(name, {}))
                        for model_dir in model_dirs for name in settings.backends
                        for loops in settings.loops]


def run_rewind(args, settings) -> int:
    """`--rewind`: the cost of each way to rewind, by backend, loop count, window, context."""
    from runtimes.rewind_study import format_rewind_table, time_rewinds

    results = []
    for backend in window_backends(args, settings)[1]:
        if backend.loops == 1:
            continue  # no rings, no carry: a rewind only shortens the sequence
        for context in args.contexts or [1024]:
            rows = time_rewinds(backend, context, [1, 4, 16, 64], snapshot_every=256)
            title = (f"{backend.name} L{backend.loops} window {backend.config.window} "
                     f"context {context} ({backend.run_dtype})")
            results.append((title, rows, format_rewind_table(title, rows)))
    return report(args, "rewind", results)


def run_speculative(args, settings) -> int:
    """`--speculative`: the "edit this file" workload, plain and speculative, by backend and
    loop count (runtimes.speculative_bench)."""
    from runtimes.benchmark import bench_tokenizer, load_for_bench
    from runtimes.speculative import speculative_config
    from runtimes.speculative_bench import format_speculative_table, time_speculative

    config = speculative_config(args.speculative, args.num_speculative_tokens, args.ngram_size,
                                args.draft_model, args.draft_loops)
    model_dirs, backends = window_backends(args, settings)
    rows = []
    for backend in backends:
        options = settings.backend_options.get(backend.name, {})
        rows.append(time_speculative(
            backend, bench_tokenizer(model_dirs[0], backend.config.vocab_size), config,
            args.steps, args.repeats,
            lambda path, loops, name=backend.name: load_for_bench(name, path, loops, options)))
    title = (f"{model_dirs[0]}: {args.speculative} speculation, edit-this-file workload "
             f"({rows[0]['file_lines']} lines, {rows[0]['prompt_tokens']} prompt tokens, "
             f"{args.steps} new tokens; median of {args.repeats} runs)")
    return report(args, "speculative", [(title, rows, format_speculative_table(title, rows))])


def run_chat_turns(args, settings) -> int:
    """`--chat-turns`: TTFT by turn with the prompt cache on and off."""
    from runtimes.rewind_study import format_chat_table, time_chat_turns

    results = []
    for backend in window_backends(args, settings)[1]:
        rows = time_chat_turns(backend, args.chat_turns, args.system_tokens, seed=args.seed)
        title = f"{backend.name} L{backend.loops} {backend.model_dir} ({backend.run_dtype})"
        results.append((title, rows, format_chat_table(title, rows)))
    return report(args, "chat_turns", results)


def report(args, key: str, results: list[tuple[str, list, str]]) -> int:
    """Print each (title, rows, table); with --json write {key: [{title, rows}]}."""
    from runtimes.benchmark import write_json

    for _, _, table in results:
        print(table + "\n")
    if args.json:
        write_json({key: [dict(title=title, rows=rows) for title, rows, _ in results]},
                   args.json)
        print(f"wrote {args.json}")
    return 0
