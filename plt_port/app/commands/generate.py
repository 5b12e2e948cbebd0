"""plt-port generate [-m DIR|NAME] [--backend NAME] [--loops N] [--decode clp|naive] PROMPT

Streams the answer to stdout as it is decoded, then prints the stats on stderr. A model with a
chat template gets the prompt as a user message (after --system-prompt's system message)
unless --ignore-chat-template says to send it as plain text. The options follow mlx-lm's
`generate` where they overlap (`-m/--model`, `-p/--prompt`, `--max-tokens`, `--temp`).
"""

from __future__ import annotations

import sys

from plt_port.app.cli import model_path, positive_int, thread_count
from plt_port.errors import PLTError


DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = ("weights and caches precision (default: the checkpoint's stored precision, "
              "config.json torch_dtype, except on the CPU: torch runs float16 checkpoints in "
              "float32 and ONNX Runtime runs float32, their CPU 16-bit kernels being slow or "
              "missing; logits are always fp32)")


def add_backend_arguments(parser) -> None:
    """Options each backend takes (shared with `plt-port bench`)."""
    parser.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    parser.add_argument("--kernel", choices=["auto", "on", "off"], default="auto",
                        help="mlx backend: Metal G-SWA kernel (default auto: when Metal is there)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="torch backend: device (default cpu)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto",
                        help="onnx backend: execution provider (default auto: CUDA when "
                             "onnxruntime-gpu finds a GPU)")
    parser.add_argument("--threads", type=thread_count,
                        help="torch/onnx backends: CPU threads (default: the framework's, one "
                             "per physical core; idle threads wait passively (torch: "
                             "OMP_WAIT_POLICY=PASSIVE unless set; onnx: no spinning), so that "
                             "cores busy with other work do not stall decoding; 1 is often "
                             "fastest for small models)")
    add_kv_arguments(parser)


def add_kv_arguments(parser) -> None:
    """mlx-lm's KV-cache quantization options (torch and mlx backends)."""
    parser.add_argument("--kv-bits", type=int, choices=(8, 4), default=None,
                        help="torch/mlx backends: quantize the global KV cache to 8 or 4 bits "
                             "(mlx-lm's --kv-bits; default: the run dtype)")
    parser.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=None,
                        help="group size of the KV quantization, along the head dim "
                             "(default 64, or the head dim when smaller)")
    parser.add_argument("--quantized-kv-start", type=int, default=0, metavar="N",
                        help="with --kv-bits: keep the KV cache in the run dtype until a "
                             "sequence holds N tokens (default 0: quantized from the start; "
                             "mlx-lm's CLI defaults to 5000)")


def kv_options(args) -> dict:
    """The load options of the KV quantization flags (none when --kv-bits is not given)."""
    if args.kv_bits is None:
        return {}
    return {"kv_bits": args.kv_bits, "kv_group_size": args.kv_group_size,
            "quantized_kv_start": args.quantized_kv_start}


def backend_options(name: str, args) -> dict:
    """The subset of the backend flags that backend `name` understands (the KV quantization
    flags go to every backend: one that cannot quantize its cache refuses them by name)."""
    options = {**({} if args.dtype is None else {"dtype": args.dtype}), **kv_options(args)}
    if name == "mlx":
        options["kernel"] = args.kernel
    if name == "torch":
        options["device"] = args.device
    if name == "onnx":
        options["provider"] = args.provider
    if name in ("torch", "onnx") and args.threads is not None:
        options["threads"] = args.threads
    return options


def add_model_arguments(parser) -> None:
    """The model, backend, decode and sampling options (shared with `plt-port chat`)."""
    add_model_argument(parser)
    parser.add_argument("--backend", help=BACKEND_HELP)
    parser.add_argument("--loops", type=int, help="inference loop count (default: the model's)")
    parser.add_argument("--decode", choices=["clp", "naive"], default="clp",
                        help="clp: all loops in one pass per token; naive: one pass per loop")
    parser.add_argument("--max-new-tokens", "--max-tokens", type=int, default=256,
                        dest="max_new_tokens", help="most tokens to generate (default 256)")
    model_default = "default: the model's generation_config.json, else "
    parser.add_argument("--temperature", "--temp", type=float,
                        help=f"0 = greedy ({model_default}0)")
    parser.add_argument("--top-k", type=int, help=f"0 = off ({model_default}0)")
    parser.add_argument("--top-p", type=float, help=f"1 = off ({model_default}1)")
    parser.add_argument("--min-p", type=float, help=f"0 = off ({model_default}0)")
    parser.add_argument("--repetition-penalty", type=float, help=f"1 = off ({model_default}1)")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop string (repeatable; not printed)")
    parser.add_argument("--system-prompt", metavar="TEXT",
                        help="system message (needs the model's chat template)")
    add_backend_arguments(parser)
    add_speculative_arguments(parser)


SPECULATIVE_HELP = (
    "speculative decoding (default off): ngram = prompt lookup (the context's last n tokens "
    "matched earlier in it, the tokens that followed drafted), draft = a draft model's greedy "
    "tokens (--draft-model). The model verifies the drafts in one prefill chunk: greedy output "
    "is unchanged and sampling keeps its distribution. It runs while the engine decodes one "
    "request alone: a verify of K drafts costs about L decode steps at batch 1 (L passes "
    "over K+1 rows), a win once more than L-1 drafts are accepted on average; a batch's "
    "decode step already shares its weight streaming among its requests, so requests side "
    "by side decode plainly")


def add_speculative_arguments(parser) -> None:
    """--speculative and its options (generate, chat, serve)."""
    from runtimes.speculative import (DEFAULT_NGRAM_SIZE, DEFAULT_NUM_TOKENS, MAX_NUM_TOKENS,
                                      METHODS)

    parser.add_argument("--speculative", choices=METHODS, default="off", help=SPECULATIVE_HELP)
    parser.add_argument("--draft-model", metavar="DIR|NAME", type=model_path,
                        help="--speculative draft: the draft model (same tokenizer; run on "
                             "the same backend, e.g. plt-stdlib-L1 for plt-stdlib-L2)")
    parser.add_argument("--draft-loops", type=positive_int, metavar="L",
                        help="--speculative draft: the loop count the draft model drafts at "
                             "(default its own)")
    parser.add_argument("--num-speculative-tokens", type=positive_int, metavar="K",
                        help=f"drafts per verify (vLLM's name; default {DEFAULT_NUM_TOKENS}, "
                             f"at most {MAX_NUM_TOKENS})")
    parser.add_argument("--ngram-size", type=positive_int, metavar="N",
                        help=f"--speculative ngram: the longest n-gram looked up, then "
                             f"shorter ones down to 1 (vLLM's prompt_lookup_max; default "
                             f"{DEFAULT_NGRAM_SIZE})")


def speculation_from(args):
    """The engine's `runtimes.speculative.Speculation` of the --speculative options (None:
    off); a draft model loads on the model's backend with its options."""
    from runtimes.backends import load_backend
    from runtimes.speculative import Speculation, speculative_config

    config = speculative_config(args.speculative, args.num_speculative_tokens, args.ngram_size,
                                args.draft_model, args.draft_loops)
    if config is None:
        return None
    return Speculation(config, lambda path, loops: load_backend(
        args.backend, path, loops=loops, **backend_options(args.backend, args)))


def add_arguments(parser):
    parser.add_argument("prompt", metavar="PROMPT", nargs="?", help="prompt text ('-' reads stdin)")
    parser.add_argument("-p", "--prompt", dest="prompt_option", metavar="PROMPT",
                        help="the prompt, as an option (mlx-lm's spelling)")
    add_model_arguments(parser)
    parser.add_argument("--ignore-chat-template", action="store_true",
                        help="use the prompt as plain text even when the model has a chat "
                             "template (default: the template wraps it as a user message)")
    parser.add_argument("--prefill-chunk-size", type=int, metavar="N",
                        help="prefill the prompt in chunks of N tokens")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not prepend the BOS token to a plain prompt (default: as "
                             "tokenizer_config.json's add_bos_token says, true when absent)")
    structured = parser.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", metavar="FILE",
                            help="answer with JSON matching the JSON schema in FILE "
                                 "(grammar-constrained decoding)")
    structured.add_argument("--regex", metavar="PATTERN",
                            help="answer with text matching the regular expression PATTERN "
                                 "whole (grammar-constrained decoding)")
    from .cache_prompt import add_prompt_cache_arguments

    add_prompt_cache_arguments(parser, lru=False)


BACKEND_HELP = ("torch, onnx or mlx (default: the model directory's: torch for a PyTorch "
                "checkpoint, onnx for an ONNX export, mlx for an MLX export or an mlx-community "
                "quantized checkpoint)")


def add_model_argument(parser) -> None:
    """-m/--model (shared with serve, bench, diagnose ...)."""
    parser.add_argument("-m", "--model", metavar="DIR|NAME", type=model_path,
                        help="model directory, or a shipped model's name (plt-stdlib-L1..L4, "
                             "plt-chains-L1..L4; default: plt-stdlib-L2)")


def resolve_model(args) -> None:
    """Fill in the defaults that depend on the model: args.model (the embedded two-loop
    model) and args.backend (the one the directory is for)."""
    from runtimes.backends import detect_backend

    if args.model is None:
        from plt_port.family import default_model_dir

        args.model = default_model_dir()
    if args.backend is None:
        args.backend = detect_backend(args.model)


def load_model(args, loops: int | None = None):
    """The backend the model options ask for (after `resolve_model`), at `loops` (default:
    --loops, else the model's)."""
    from runtimes.backends import load_backend

    return load_backend(args.backend, args.model, loops=args.loops if loops is None else loops,
                        **backend_options(args.backend, args))


def sampling_params(args, backend):
    """The sampling options over the model's generation_config.json defaults."""
    from runtimes.sampling import resolve_sampling

    return resolve_sampling(backend.generation_config.sampling_defaults(),
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed)


def system_messages(args) -> list[dict]:
    return [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []


def templated_prompt(tokenizer, prompt: str, args) -> str | list[int]:
    """The prompt as a user message under the model's chat template (ids), or as plain text
    when the model has no template or --ignore-chat-template says so (mlx-lm's behaviour)."""
    if not tokenizer.chat_template or args.ignore_chat_template:
        if args.system_prompt is not None:
            raise PLTError("--system-prompt needs the model's chat template ("
                           + ("--ignore-chat-template is set)" if tokenizer.chat_template
                              else "this model has none)"))
        return prompt
    return tokenizer.encode_chat(system_messages(args) + [{"role": "user", "content": prompt}])


def format_stats(last, requested_mode: str) -> str:
    mode = last.decode_mode
    if mode != requested_mode:
        mode += f" ({requested_mode} needs a PLT checkpoint and loops >= 2)"
    return (f"[{last.backend}, loops={last.loops}, decode={mode}] "
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"ttft: {last.ttft_s * 1e3:.1f} ms | cache: {last.cache_bytes / 2**20:.2f} MiB | "
            f"finish: {last.finish_reason}"
            + (f" | {last.speculative.line()}" if last.speculative is not None else ""))


def read_stdin() -> str:
    """The prompt from stdin. Undecodable bytes: an error here, or (when Python's stdin
    escapes them) lone surrogates that the tokenizer refuses, as for bad bytes in argv."""
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as exc:
        raise PLTError(f"stdin is not valid {exc.encoding} text ({exc.reason} at byte "
                       f"{exc.start})") from None


def answer_grammar(args, backend, tokenizer):
    """The grammar --json-schema or --regex asks for, or None."""
    if args.json_schema is None and args.regex is None:
        return None
    from plt_port.files import read_json_object
    from runtimes.grammar import GrammarError, model_compiler

    compiler = model_compiler(tokenizer, backend)
    if args.regex is not None:
        return compiler.regex(args.regex)
    return compiler.json_schema(read_json_object(args.json_schema, GrammarError))


def prompt_text(args) -> str:
    if args.prompt is not None and args.prompt_option is not None:
        raise PLTError("give the prompt once: as PROMPT or as -p/--prompt")
    prompt = args.prompt if args.prompt is not None else args.prompt_option
    if prompt is None:
        raise PLTError("no prompt: give it as PROMPT, -p/--prompt, or '-' to read stdin")
    prompt = read_stdin() if prompt == "-" else prompt
    if not prompt:
        raise PLTError("the prompt is empty")
    return prompt


def cached_prompt(args, backend, tokenizer, prompt: str):
    """(prompt, prompt cache): with --prompt-cache-file, the file's tokens and then PROMPT's
    as plain text continuing them (mlx-lm's generate --prompt-cache-file), the file loaded
    as the cache's entry; else the (templated) prompt and no cache."""
    if args.prompt_cache_file is None:
        return templated_prompt(tokenizer, prompt, args), None
    from runtimes.prompt_cache import PromptCache, load_state

    state = load_state(args.prompt_cache_file, backend)
    cache = PromptCache(max_entries=1)
    cache.insert(backend, state, pinned=True)
    return state.history.slots[0].tokens + tokenizer.encode(prompt, add_bos=False), cache


def run(args):
    from plt_port.tokenizer import Tokenizer
    from runtimes.generate import stream_generate

    prompt = prompt_text(args)
    resolve_model(args)
    backend = load_model(args)
    tokenizer = Tokenizer.from_dir(args.model)
    grammar = answer_grammar(args, backend, tokenizer)
    prompt, prompt_cache = cached_prompt(args, backend, tokenizer, prompt)
    speculation = speculation_from(args)
    last = None
    for last in stream_generate(backend, tokenizer, prompt,
                                max_new_tokens=args.max_new_tokens,
                                sampling=sampling_params(args, backend),
                                stop=args.stop, decode_mode=args.decode,
                                prefill_chunk_size=args.prefill_chunk_size,
                                add_bos=False if args.no_bos else None, grammar=grammar,
                                prompt_cache=prompt_cache, speculation=speculation):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(format_stats(last, args.decode), file=sys.stderr)
    return 0
