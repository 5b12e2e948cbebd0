"""plt-port demo [-m DIR|NAME ...] [--host 127.0.0.1] [--port 7860]: the Gradio comparison page.

Without --model it serves the embedded families (plt_port.family). The ONNX and MLX versions
of a model are exported on first use into the export cache ($PLT_PORT_CACHE). The columns run
on one `runtimes.engine.BatchEngine` per (model, backend) (see demo/columns.py).
"""

from __future__ import annotations

import os

from plt_port.app.commands.generate import DTYPE_HELP, DTYPES, add_kv_arguments, kv_options
from plt_port.app.cli import check_port, model_path, thread_count
from plt_port.errors import PLTError

NO_MODELS = ("no models to serve: the embedded model family is not in this installation "
             "(plt_port/family is empty). Train it with `plt-port train` (see README.md), or "
             "pass model directories with --model DIR (PyTorch PLT models in Hugging Face "
             "layout: config.json, model.safetensors, tokenizer.model).")


def add_arguments(parser):
    parser.add_argument("-m", "--model", action="append", metavar="DIR|NAME", default=None,
                        type=model_path,
                        help="model directory or shipped model name to offer (repeat for "
                             "several); default: the embedded families")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--max-new-tokens", "--max-tokens", type=int, default=512,
                        help="cap on new tokens per column (default 512)")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024,
                        help="cap on prompt tokens (default 1024)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="comparisons that run at once; more wait in the queue (default 2)")
    parser.add_argument("--queue-size", type=int, default=32,
                        help="comparisons that may wait; more are turned away (default 32)")
    parser.add_argument("--threads", type=thread_count, default=1,
                        help="intra-op threads of the PyTorch and ONNX Runtime backends "
                             "(default 1: small models decode fastest on one thread, and the "
                             "columns share the CPU)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    add_kv_arguments(parser)


def family_dirs() -> list[str]:
    """The embedded families' model dirs present here: stdlib first (its L1, L2 are the
    default columns), then chains, each in loop order."""
    from plt_port.family import FAMILIES, family_model_dirs

    return [d for corpus in FAMILIES for d in family_model_dirs(corpus).values()]


def run(args):
    from demo.columns import Limits

    for name in ("max_new_tokens", "max_prompt_tokens", "concurrency", "queue_size", "port",
                 "threads"):
        if getattr(args, name) < 1:
            raise PLTError(f"--{name.replace('_', '-')} must be at least 1, "
                           f"got {getattr(args, name)}")
    check_port(args.port)
    model_dirs = args.model or family_dirs()
    if not model_dirs:
        raise PLTError(NO_MODELS)
    for model_dir in model_dirs:
        if not os.path.isdir(model_dir):
            raise PLTError(f"--model {model_dir}: not a directory")

    from demo.app import build_app, launch

    limits = Limits(max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    concurrency=args.concurrency, queue_size=args.queue_size)
    threads = {"threads": args.threads}
    dtype = {} if args.dtype is None else {"dtype": args.dtype}
    kv = kv_options(args)  # torch and MLX columns; ONNX keeps its caches in the export dtype
    app = build_app(model_dirs, limits, backend_options={"torch": {**threads, **dtype, **kv},
                                                         "onnx": {**threads, **dtype},
                                                         "mlx": {**dtype, **kv}})
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"plt-port demo: serving on {args.host}: reachable from other machines", flush=True)
    launch(app, host=args.host, port=args.port)
    return 0
