"""plt-port train --out RUN_DIR --loops 1 2 3 4 [recipe options]

Trains one model per loop count with the same data, tokenizer, width, depth, steps and
seed, one after another. `--corpus chains` trains on variable-chain programs
(plt_port/tasks.py) instead of the standard library. Re-running the same command resumes where it stopped. Works
under `torchrun --nproc_per_node N -m plt_port.app.cli train ...` (DDP; rank 0 writes).
"""

from __future__ import annotations

import dataclasses

from plt_port.app.cli import thread_count


def add_arguments(parser):
    from plt_port.train import CORPORA, Recipe

    parser.add_argument("--out", required=True, help="run directory (checkpoints, final models)")
    parser.add_argument("--loops", type=int, nargs="+", default=[2],
                        help="loop counts to train, one model each (default: 2)")
    parser.add_argument("--name-prefix",
                        help="model name = prefix + loop count (default: plt-CORPUS-L)")
    parser.add_argument("--tokenizer", help="reuse this tokenizer dir instead of training one")
    parser.add_argument("--threads", type=thread_count,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--stop-after", type=int,
                        help="leave after this many steps per model (checkpointed; resume later)")
    parser.add_argument("--checkpoint-every", type=float, default=300.0, metavar="SECONDS",
                        help="checkpoint interval in seconds (default: 300)")
    parser.add_argument("--ship-dir", help="also write each finished model here as fp16")
    recipe = parser.add_argument_group("recipe")
    for field in dataclasses.fields(Recipe):
        if field.name == "loops":
            continue
        recipe.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                            default=field.default, help=f"(default: {field.default})",
                            choices=CORPORA if field.name == "corpus" else None)


def run(args):
    import os

    import torch

    from plt_port.errors import PLTError
    from plt_port.train import Recipe, init_distributed, ship_fp16, train_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if f.name != "loops"}
    dist_info = init_distributed(args.device)
    for loops in args.loops:
        if not 1 <= loops <= 8:
            raise PLTError(f"--loops: each loop count must be in 1..8, got {loops}")
    for loops in args.loops:
        name = f"{args.name_prefix or f'plt-{args.corpus}-L'}{loops}"
        recipe = Recipe(**{**fields, "loops": loops})
        state = train_model(args.out, name, recipe, dist_info, args.tokenizer,
                            args.stop_after, args.checkpoint_every)
        final_dir = os.path.join(args.out, name, "final")
        if args.ship_dir and dist_info.is_main and state["step"] == recipe.steps:
            ship_fp16(final_dir, os.path.join(args.ship_dir, name))
            print(f"{name}: shipped fp16 copy to {os.path.join(args.ship_dir, name)}")
    if dist_info.world_size > 1:
        torch.distributed.destroy_process_group()
