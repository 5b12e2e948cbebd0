"""plt-port precision MODEL_DIR [--backend mlx|onnx|torch] [--context N]: how close
low-precision exports (MLX: bf16/fp16/8-bit/4-bit; ONNX: fp16/int8/int4) and quantized KV
caches (torch, MLX: kv8/kv4 against the unquantized cache) decode to the same backend at full
precision.

Greedy tokens of the reference are fed to each variant (teacher forcing); the table gives
the share of identical greedy tokens, mean KL(reference || variant) and the identical prefix
of each variant's own greedy run. `--context N` makes the prompt N tokens long (the model's
own text from the standard library when it has a tokenizer, else seeded random ids), and
runs a copy of the model whose config allows N + steps positions when it allows fewer.
"""

from __future__ import annotations

import os
import sysconfig

from exporters.mlx_export import GROUP_SIZES
from plt_port.app.cli import model_path

VARIANT_NAMES = ("bf16", "fp16", "q8", "q4", "int8", "int4", "kv8", "kv4")
DEFAULT_VARIANTS = {"mlx": ["bf16", "fp16", "q8", "q4"], "onnx": ["fp16", "int8", "int4"],
                    "torch": ["kv8", "kv4"]}
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser):
    parser.add_argument("model_dir", type=model_path,
                        help="PyTorch PLT model directory (HF layout) or shipped model name")
    parser.add_argument("--prompt", default="def binary_search(items, target):\n    ")
    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help="a prompt of N tokens instead of --prompt (see above)")
    parser.add_argument("--steps", type=int, default=64, help="decoded tokens (default 64)")
    parser.add_argument("--loops", type=int, default=None,
                        help="inference loop count (default: the checkpoint's)")
    parser.add_argument("--backend", choices=tuple(DEFAULT_VARIANTS), default="mlx",
                        help="backend whose variants are compared (default mlx)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="precision of the reference and of the KV variants (default "
                             "float32)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                        help="weight quantization group (block) size (default: mlx 64, onnx 32)")
    parser.add_argument("--kv-group-size", type=int, choices=GROUP_SIZES, default=None,
                        help="KV quantization group size (default 64, or the head dim when "
                             "smaller)")
    parser.add_argument("--prefill-chunk-size", type=int, default=None, metavar="N",
                        help="prefill the prompt in chunks of N tokens")
    parser.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=None,
                        help="mlx: bf16 fp16 q8 q4 kv8 kv4; onnx: fp16 int8 int4; torch: kv8 "
                             "kv4 (default: mlx and onnx their weight variants, torch kv8 kv4)")


def long_prompt(model_dir: str, tokens: int, vocab_size: int, seed: int = 0) -> list[int]:
    """`tokens` ids: Python standard-library source through the model's tokenizer (the text
    the embedded family was trained on), or seeded random ids for a model without one."""
    import numpy as np

    from plt_port.errors import PLTError
    from plt_port.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_dir(model_dir)
    except PLTError:  # no tokenizer files: a random model
        return np.random.default_rng(seed).integers(3, vocab_size, tokens).tolist()
    stdlib = sysconfig.get_paths()["stdlib"]
    ids = tokenizer.encode("", add_bos=True)
    for name in sorted(os.listdir(stdlib)):
        if len(ids) >= tokens:
            break
        if name.endswith(".py"):
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
                ids += tokenizer.encode(f.read(), add_bos=False)
    return ids[:tokens]


def run(args):
    from plt_port.config import PLTConfig
    from plt_port.errors import PLTError
    from plt_port.tokenizer import Tokenizer
    from runtimes.precision import agreement, with_positions

    if args.context is not None and args.context < 1:
        raise PLTError(f"--context must be at least 1, got {args.context}")
    if args.context is None:
        prompt = Tokenizer.from_dir(args.model_dir).encode(args.prompt, add_bos=True)
    else:
        config = PLTConfig.from_file(args.model_dir)
        prompt = long_prompt(args.model_dir, args.context, config.vocab_size)
    variants = args.variants or DEFAULT_VARIANTS[args.backend]
    with with_positions(args.model_dir, len(prompt) + args.steps) as model_dir:
        results = agreement(model_dir, prompt, args.steps, args.loops, variants,
                            args.group_size, args.backend, args.kv_group_size, args.dtype,
                            args.prefill_chunk_size)
    print(f"{args.backend}, {args.dtype} reference, prompt {len(prompt)} tokens")
    print(f"| variant | identical greedy tokens (teacher-forced, {args.steps} steps) | "
          f"mean KL(reference || variant) | identical prefix of free greedy run |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['identical_greedy']:.3f} | {row['mean_kl']:.2e} | "
              f"{row['free_run_identical_prefix']} |")
    return 0
