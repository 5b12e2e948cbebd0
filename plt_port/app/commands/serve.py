"""plt-port serve [--model DIR] [--backend torch|onnx|mlx] [--loops N] [--host 127.0.0.1]
[--port 8000] [--max-batch N] [--api-key KEY] [--chat-template FILE] [--tool-call-parser
NAME] [--reasoning-parser NAME]: an OpenAI- and Anthropic-compatible server with continuous
batching.

Without --model it serves the embedded two-loop model. Each request gets one access-log line
on stderr. Ctrl-C or SIGTERM stops it: requests in flight end with a 503 (a stream with an
error event and its clean end), the engine closes, and the command exits 0. `--bench
STREAMS` starts the server on a free local port, measures one stream and STREAMS concurrent
ones over HTTP (the best of BENCH_ROUNDS alternating rounds of each), prints the figures and
the server's /metrics (all rounds), and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import replace

from plt_port.app.cli import check_port, model_path, positive_int
from plt_port.app.commands.cache_prompt import add_prompt_cache_arguments, prompt_cache_from
from plt_port.app.commands.generate import (BACKEND_HELP, add_backend_arguments,
                                            add_speculative_arguments, backend_options,
                                            resolve_model, speculation_from)
from plt_port.app.reasoning import REASONING_PARSERS
from plt_port.app.server_options import (DEFAULT_CHAT_MAX_TOKENS, MIN_MAX_REQUEST_BYTES,
                                         REQUEST_BYTES_PER_TOKEN, ServerOptions)
from plt_port.app.tool_parsers import TOOL_PARSERS, resolve_tool_parser
from plt_port.errors import PLTError
from runtimes.serve_compare import free_port


GRACEFUL_SHUTDOWN_S = 5
BENCH_ROUNDS = 3


class ModelLoadError(RuntimeError):
    """A served model that no longer loads (a 500: its paths stay in the server log)."""


def add_arguments(parser):
    parser.add_argument("-m", "--model", metavar="DIR|NAME", type=model_path,
                        help="model directory or shipped model name (default: the embedded "
                             "two-loop model)")
    parser.add_argument("--backend", help=BACKEND_HELP)
    parser.add_argument("--loops", type=positive_int,
                        help="default loop count (default: the model's); requests may ask for "
                             "others with the model id NAME@loops=K or the body field loops")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch", type=positive_int, default=16,
                        help="sequences decoded together at most (default 16)")
    parser.add_argument("--max-queue", type=positive_int, default=64,
                        help="requests that may wait for a batch slot; more get 429 (default 64)")
    parser.add_argument("--decode", choices=["clp", "naive"], default="clp",
                        help="decode mode (default clp)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model id clients use (default: the model directory's name)")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require this key (Authorization: Bearer KEY, or x-api-key on "
                             "/v1/messages) on every route but /health (default: "
                             "$PLT_PORT_API_KEY, else none)")
    parser.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN", default=(),
                        help="browser origins allowed by CORS, e.g. http://localhost:3000 "
                             "(default: none, CORS off)")
    parser.add_argument("--chat-template", metavar="FILE",
                        help="a Jinja2 chat template to use instead of the model's (e.g. one "
                             "with tool support)")
    parser.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS),
                        help="the format of the model's tool calls (default: inferred from "
                             "the chat template; none when it has no tool calls)")
    parser.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS),
                        help="read a <think>...</think> block into reasoning_content / "
                             "thinking blocks (default: off)")
    parser.add_argument("--max-tokens", type=positive_int, default=DEFAULT_CHAT_MAX_TOKENS,
                        help="answer length of a chat request that sets none, capped by the "
                             f"context left (default {DEFAULT_CHAT_MAX_TOKENS})")
    parser.add_argument("--max-request-bytes", type=positive_int,
                        help="largest request body; larger ones get 413 (default: the "
                             f"model's context at {REQUEST_BYTES_PER_TOKEN} bytes a token, at "
                             f"least {MIN_MAX_REQUEST_BYTES}; 4 MiB for a 128k context)")
    add_prompt_cache_arguments(parser)
    parser.add_argument("--bench", type=positive_int, metavar="STREAMS",
                        help="measure 1 vs STREAMS concurrent streams on a local port and exit")
    parser.add_argument("--bench-tokens", type=positive_int, default=64,
                        help="tokens per stream of --bench (default 64)")
    add_backend_arguments(parser)
    add_speculative_arguments(parser)


def open_server(model_dir: str, backend: str = "torch", loops: int | None = None, *,
                max_batch: int = 16, max_queue: int = 64, decode_mode: str = "clp",
                options: dict | None = None, served_model_name: str | None = None,
                chat_template: str | None = None, server_options=None, prompt_cache=None,
                speculation=None):
    """(engine, app): the engine started with the backend loaded on its thread.
    `chat_template`: a template's text, used instead of the model's; `server_options`: a
    `ServerOptions` (its tool parser: the template's when unset); `prompt_cache`: a
    `runtimes.prompt_cache.PromptCache` (None: off); `speculation`: a
    `runtimes.speculative.Speculation` (None: off)."""
    from plt_port.app.server import create_app
    from plt_port.tokenizer import Tokenizer
    from runtimes.backends import load_backend
    from runtimes.engine import BatchEngine

    tokenizer = Tokenizer.from_dir(model_dir)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    server_options = server_options or ServerOptions()
    server_options = replace(server_options, tool_call_parser=resolve_tool_parser(
        server_options.tool_call_parser, tokenizer.chat_template))

    def load(at_loops):
        if at_loops is None:  # at the start: a bad model is the command's error
            return load_backend(backend, model_dir, loops=loops, **(options or {}))
        try:
            return load_backend(backend, model_dir, loops=at_loops, **(options or {}))
        except PLTError as exc:  # the model changed under the server: not the client's fault
            raise ModelLoadError(f"could not load the model for {at_loops} loops") from exc

    engine = BatchEngine(load, tokenizer, max_batch=max_batch, max_queue=max_queue,
                         decode_mode=decode_mode, prompt_cache=prompt_cache,
                         speculation=speculation).start()
    name = served_model_name or os.path.basename(os.path.normpath(model_dir))
    return engine, create_app(engine, tokenizer, name, server_options)


def read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PLTError(f"--chat-template {path}: {exc}") from None


def log_access_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access = logging.getLogger("plt_port.app.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)


def uvicorn_server(app, host: str, port: int):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server; on shutdown the streams in flight end first, with an error
        event, so their connections close cleanly within the grace period."""

        async def shutdown(self, sockets=None):
            app.state.service.stop_generations()
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                 timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))


def interrupt(signum, frame):
    raise KeyboardInterrupt


def start_in_thread(app, host: str = "127.0.0.1", port: int | None = None):
    """(uvicorn server, its thread, base URL) of `app` served from a background thread;
    `server.should_exit = True` stops it."""
    port = port or free_port(host)
    server = uvicorn_server(app, host, port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise PLTError(f"the server could not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread, f"http://{host}:{port}"


def run(args):
    previous = signal.signal(signal.SIGTERM, interrupt)  # a stop like Ctrl-C's
    try:
        return run_server(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_server(args):
    check_port(args.port)
    resolve_model(args)
    server_options = ServerOptions(
        api_key=args.api_key or os.environ.get("PLT_PORT_API_KEY") or None,
        allowed_origins=tuple(args.allowed_origins), tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser, default_max_tokens=args.max_tokens,
        max_request_bytes=args.max_request_bytes)
    engine, app = open_server(args.model, args.backend, args.loops, max_batch=args.max_batch,
                              max_queue=args.max_queue, decode_mode=args.decode,
                              options=backend_options(args.backend, args),
                              served_model_name=args.served_model_name,
                              chat_template=read_chat_template(args.chat_template),
                              prompt_cache=prompt_cache_from(args),
                              speculation=speculation_from(args),
                              server_options=server_options)
    try:
        if args.bench:
            return bench(app, args.bench, args.bench_tokens)
        print(f"plt-port serve: http://{args.host}:{args.port}/v1 ({app.title} "
              f"{os.path.basename(os.path.normpath(args.model))}, {args.backend}, "
              f"{engine.backend.loops} loops, batches of up to {args.max_batch}; tool calls: "
              f"{app.state.service.options.tool_call_parser or 'off'}; "
              f"{'API key required; ' if server_options.api_key else ''}Ctrl-C stops)",
              file=sys.stderr, flush=True)
        log_access_to_stderr()
        try:
            uvicorn_server(app, args.host, args.port).run()
        except KeyboardInterrupt:  # uvicorn raises the signal again once it has shut down
            pass
    finally:
        engine.close()
    print("plt-port serve: stopped", file=sys.stderr)
    return 0


# ---- --bench -----------------------------------------------------------------------------------
def bench(app, streams: int, max_tokens: int) -> int:
    import multiprocessing
    import urllib.request

    from runtimes.serve_compare import concurrent_streams

    server, thread, url = start_in_thread(app)
    try:
        # the clients run in another process: their threads must not hold the server's GIL
        with multiprocessing.get_context("spawn").Pool(1) as clients:
            clients.apply(concurrent_streams, (url, streams, 4))  # warm-up: every batch width
            # the best of a few alternating rounds: other load on the machine only slows a run
            rounds = [(clients.apply(concurrent_streams, (url, 1, max_tokens)),
                       clients.apply(concurrent_streams, (url, streams, max_tokens)))
                      for _ in range(BENCH_ROUNDS)]
        singles, crowds = zip(*rounds)
        (single_tps, single_ttft), (many_tps, many_ttft) = max(singles), max(crowds)
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            metrics = response.read().decode()
    finally:
        server.should_exit = True
        thread.join(GRACEFUL_SHUTDOWN_S + 5)
    print(f"1 stream: {single_tps:.1f} tok/s, ttft {single_ttft[0] * 1e3:.0f} ms\n"
          f"{streams} streams: {many_tps:.1f} tok/s aggregate ({many_tps / single_tps:.2f}x), "
          f"ttft median {statistics.median(many_ttft) * 1e3:.0f} ms, "
          f"max {max(many_ttft) * 1e3:.0f} ms\n")
    print("\n".join(line for line in metrics.splitlines()
                    if line.startswith("plt_") and "_created" not in line))
    return 0
