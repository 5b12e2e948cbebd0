"""`plt-port` command line: one subcommand per module in `plt_port.app.commands`.

Only the chosen subcommand's module is imported, so `plt-port --help` stays fast and a
backend that is not installed never breaks an unrelated command. Each module defines
`add_arguments(parser)` and `run(args) -> int | None`, and imports heavy packages inside `run`.
A usage error names the subcommand's usage and, for an unknown option or command, the
closest known ones.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.metadata
import os
import re
import sys

from plt_port.errors import PLTError

COMMANDS = {
    "generate": "generate text from a prompt on any backend (streams to the terminal)",
    "bench": "decode/prefill speed and cache memory across loop counts, decode modes, backends",
    "train": "train a PLT model (tokenizer, corpus, training loop; single process or torchrun)",
    "eval": "held-out loss, perplexity and next-token accuracy across loop counts",
    "export": "export a model directory to ONNX or MLX",
    "info": "parameters, weight and KV-cache bytes, peak memory per backend (from config.json)",
    "precision": "agreement of bf16/fp16/8-bit/4-bit MLX exports with fp32 (greedy tokens, KL)",
    "diagnose": "per-loop diagnostics (step size, logit-lens KL, effective rank, ...)",
    "study": "eval + diagnostics over the model family, written as a markdown report",
    "card": "the model family's MODEL_CARD.md and heldout.json from a training run and eval rows",
    "demo": "Gradio demo comparing loop counts and backends side by side",
    "serve": "OpenAI-compatible HTTP server with continuous batching (/v1/completions, chat)",
    "serve-compare": "serving speed of plt-port serve against vLLM's server on the same model",
    "chat": "chat with a model in the terminal (a REPL with history; reads stdin lines)",
    "cache-prompt": "prefill a long prefix once and save its state for generate/chat/serve",
}


def check_port(port: int) -> None:
    """A TCP port to listen on (the commands that serve: demo, serve)."""
    if port > 65535:
        raise PLTError(f"--port must be at most 65535, got {port}")


def positive_int(text: str) -> int:
    """argparse type of counts and sizes: an integer >= 1 (a bad value is a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def thread_count(text: str) -> int:
    """argparse type of --threads: 1 to the CPU cores this process may use."""
    from plt_port.memory import MemoryLimitError, check_thread_count

    value = positive_int(text)
    try:
        check_thread_count(value, "the thread count")
    except MemoryLimitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def model_path(text: str) -> str:
    """argparse type of --model: a model directory, or a shipped model's name
    (`plt-stdlib-L3`, ..., as the demo and /v1/models show them)."""
    from plt_port.family import resolve_model_dir

    try:
        return resolve_model_dir(text)
    except PLTError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Parser(argparse.ArgumentParser):
    """argparse, with a did-you-mean after an unknown option or choice."""

    def error(self, message: str):
        words = re.findall(r"invalid choice: '([^']*)'", message)
        if message.startswith("unrecognized arguments: "):
            words = [w.split("=")[0] for w in message.split(": ", 1)[1].split()
                     if w.startswith("-")]
        known = [name for action in self._actions
                 for name in [*action.option_strings, *map(str, action.choices or ())]]
        guesses = [g for w in words for g in difflib.get_close_matches(w, known, n=2)]
        if guesses:
            message += f" (did you mean {' or '.join(dict.fromkeys(guesses))}?)"
        super().error(message)


def _command_module(name: str):
    return importlib.import_module(f"plt_port.app.commands.{name.replace('-', '_')}")


def version() -> str:
    try:
        return importlib.metadata.version("plt-port")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; `command`: that subcommand's options are added (only its own
    module is imported)."""
    parser = Parser(prog="plt-port", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"plt-port {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, help_text in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _command_module(name).add_arguments(sub_parser)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line. A subcommand's arguments are parsed by its own parser, so a
    usage error shows that subcommand's usage."""
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    if command is None:
        return parser.parse_args(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args = sub.choices[command].parse_args(argv[1:])
    args.command = command
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # torch's OpenMP threads sleep while they wait for work instead of spinning (unless the
    # user says otherwise): spinning threads on cores that other processes also use stall
    # every parallel region (2.7k-token prompt on 2 shared cores: 1-8 tok/s spinning, 23-135
    # passive). Read when torch loads: set before any command imports it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        return _command_module(args.command).run(args) or 0
    except PLTError as exc:
        print(f"plt-port {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a missing file, a directory where a file was expected, ...
        print(f"plt-port {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"plt-port {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
