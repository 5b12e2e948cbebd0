"""plt-port precision MODEL_DIR [--backend mlx|onnx]: how close low-precision exports (MLX:
bf16/fp16/8-bit/4-bit; ONNX: fp16/int8/int4) decode to the same backend in fp32.

Greedy tokens of the fp32 export are fed to each variant (teacher forcing); the table gives
the share of identical greedy tokens, mean KL(fp32 || variant) and the identical prefix of
each variant's own greedy run.
"""

from __future__ import annotations

from exporters.mlx_export import GROUP_SIZES
from plt_port.app.cli import model_path

VARIANT_NAMES = ("bf16", "fp16", "q8", "q4", "int8", "int4")
DEFAULT_VARIANTS = {"mlx": ["bf16", "fp16", "q8", "q4"], "onnx": ["fp16", "int8", "int4"]}


def add_arguments(parser):
    parser.add_argument("model_dir", type=model_path,
                        help="PyTorch PLT model directory (HF layout) or shipped model name")
    parser.add_argument("--prompt", default="def binary_search(items, target):\n    ")
    parser.add_argument("--steps", type=int, default=64, help="decoded tokens (default 64)")
    parser.add_argument("--loops", type=int, default=None,
                        help="inference loop count (default: the checkpoint's)")
    parser.add_argument("--backend", choices=tuple(DEFAULT_VARIANTS), default="mlx",
                        help="backend whose exports are compared (default mlx)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                        help="quantization group (block) size (default: mlx 64, onnx 32)")
    parser.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=None,
                        help="mlx: bf16 fp16 q8 q4; onnx: fp16 int8 int4 (default: all)")


def run(args):
    from plt_port.tokenizer import Tokenizer
    from runtimes.precision import agreement

    prompt = Tokenizer.from_dir(args.model_dir).encode(args.prompt, add_bos=True)
    results = agreement(args.model_dir, prompt, args.steps, args.loops,
                        args.variants or DEFAULT_VARIANTS[args.backend], args.group_size,
                        args.backend)
    print(f"| variant | identical greedy tokens (teacher-forced, {args.steps} steps) | "
          f"mean KL(fp32 || variant) | identical prefix of free greedy run |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['identical_greedy']:.3f} | {row['mean_kl']:.2e} | "
              f"{row['free_run_identical_prefix']} |")
    return 0
