"""plt-port cache-prompt --model DIR --prompt-file F OUT [backend options]

Prefills the text of F (a repository's context, a long system prompt: plain text, continued
by the later prompt, as mlx-lm's `cache_prompt`) and writes the state after it to OUT, a
safetensors prompt cache (`plt_port.prompt_cache_file`), atomically. `generate`, `chat` and
`serve --prompt-cache-file OUT` start from it; a file of another model, loop count, dtype or
KV quantization is refused by name.

Also the prompt-cache options of serve, chat, demo and generate (`add_prompt_cache_arguments`).
"""

from __future__ import annotations

import argparse
import os
import sys

from plt_port.app.cli import model_path
from plt_port.errors import PLTError

from .generate import BACKEND_HELP, add_backend_arguments, load_model, resolve_model

PROGRESS_CHUNK = 512  # prompt tokens per prefill call (one progress bar step)
BYTE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def byte_count(text: str) -> int:
    """argparse type of a size in bytes: 1073741824, 512M, 2G (binary units)."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = value[-1:] if value[-1:] in BYTE_UNITS else ""
    try:
        count = float(value[:len(value) - len(unit)]) * BYTE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 512M or 2G, "
                                         f"got {text!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return int(count)


def add_prompt_cache_arguments(parser, lru: bool = True) -> None:
    """--prompt-cache-file, and with `lru` the in-memory cache's bounds."""
    parser.add_argument("--prompt-cache-file", metavar="FILE",
                        help="start from the prompt cache FILE (plt-port cache-prompt): prompts "
                             "beginning with its tokens skip their prefill")
    if lru:
        from runtimes.prompt_cache import DEFAULT_MAX_ENTRIES, DEFAULT_MEMORY_FRACTION

        parser.add_argument("--prompt-cache-size", type=int, default=DEFAULT_MAX_ENTRIES,
                            metavar="N", help="finished requests' states kept to start later "
                                              "requests sharing their prefix (default "
                                              f"{DEFAULT_MAX_ENTRIES}; 0: off)")
        parser.add_argument("--prompt-cache-bytes", type=byte_count, default=None,
                            metavar="BYTES", help="at most this many bytes of them, e.g. 2G "
                                                  f"(default: {DEFAULT_MEMORY_FRACTION:.0%}% of the "
                                                  "memory available at start)")


def prompt_cache_from(args, lru: bool = True):
    """The PromptCache the options ask for (None: off), with --prompt-cache-file to load."""
    from runtimes.prompt_cache import PromptCache

    size = args.prompt_cache_size if lru else 1
    if size < 0:
        raise PLTError(f"--prompt-cache-size must be >= 0, got {size}")
    if size == 0 and args.prompt_cache_file is None:
        return None
    cache = PromptCache(size, args.prompt_cache_bytes if lru else None)
    if args.prompt_cache_file is not None:
        cache.files.append(args.prompt_cache_file)
    return cache


def add_arguments(parser):
    parser.add_argument("-m", "--model", metavar="DIR|NAME", type=model_path,
                        help="model directory or shipped model name (default: the embedded "
                             "two-loop model)")
    parser.add_argument("--backend", help=BACKEND_HELP)
    parser.add_argument("--loops", type=int, help="inference loop count (default: the model's)")
    parser.add_argument("--prompt-file", metavar="F", required=True,
                        help="the text to cache ('-' reads stdin)")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not start with the tokenizer's bos token")
    parser.add_argument("out", metavar="OUT", help="the prompt cache file to write (.safetensors)")
    add_backend_arguments(parser)


def read_prompt_file(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PLTError(f"--prompt-file {path}: {exc}") from None


def run(args):
    from tqdm import tqdm

    from plt_port.tokenizer import Tokenizer
    from runtimes.prompt_cache import save_state

    text = read_prompt_file(args.prompt_file)
    if os.path.isdir(args.out):
        raise PLTError(f"{args.out} is a directory; give the file to write")
    resolve_model(args)
    backend = load_model(args)
    tokenizer = Tokenizer.from_dir(args.model)
    ids = tokenizer.encode(text, add_bos=False if args.no_bos else tokenizer.add_bos_token)
    if not ids:
        raise PLTError(f"--prompt-file {args.prompt_file} holds no tokens")
    limit = backend.config.max_position_embeddings
    if len(ids) > limit:
        raise PLTError(f"--prompt-file {args.prompt_file} is {len(ids)} tokens, more than the "
                       f"model's max_position_embeddings={limit}")
    state = None
    with tqdm(total=len(ids), unit="tok", desc="cache-prompt", disable=None) as bar:
        for start in range(0, len(ids), PROGRESS_CHUNK):
            chunk = ids[start:start + PROGRESS_CHUNK]
            if state is None:
                state, _ = backend.prefill([chunk], len(ids))
            else:
                backend.extend(state, chunk)
            bar.update(len(chunk))
    save_state(args.out, backend, state, ids)
    print(f"plt-port cache-prompt: {len(ids)} tokens of {args.prompt_file} -> {args.out} "
          f"({os.path.getsize(args.out) / 2**20:.2f} MiB; {backend.name}, loops "
          f"{backend.loops}, {backend.run_dtype})", file=sys.stderr)
    return 0
