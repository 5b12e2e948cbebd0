"""Training loop for the reference PLT model (single process or `torchrun` DDP).

Recipe (nanoGPT style): AdamW (weight decay on matrices only), linear warmup then cosine
decay to `min_lr`, gradient clipping, fp32 on CPU and bf16 autocast on CUDA. The loss is
the cross-entropy of loop L's logits (SPEC section 2).

A run directory holds:
  tokenizer/            sentencepiece model shared by every model of the run
  tokens-{split}.npy    the encoded corpus (int32, no pickle; corpus "stdlib")
  chains-train.txt      the programs the tokenizer was trained on (corpus "chains")
  {name}/checkpoint/    latest state: model/ (HF layout, fp32), optimizer.safetensors,
                        trainer_state.json (step, loss log, validation log, recipe)
  {name}/final/         the trained model in the HF layout of SPEC section 5 (fp32)
Every write is atomic. Re-running the same command resumes from the checkpoint and
continues bit-for-bit as if never interrupted: the data of step s depends only on
(seed, step), and model and optimizer state are saved exactly.

Corpora: "stdlib" (language modelling on the standard library, `plt_port.data`) or
"chains" (`plt_port.tasks`: one variable-chain program per window, of a depth drawn from
min_depth..max_depth). Its loss is not on every token: names, constants and line order are
random by construction, an entropy floor that would dwarf the answer's loss. It is on the
answer and, at each assignment's newline, on the value that assignment computes (never shown
in the input, so the model must still carry it through the chain itself): with the answer
alone, small models stayed at chance for 400 steps. The validation loss is on the answer
alone, what `plt-port eval --task chains` scores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from . import data, tasks
from .atomic import atomic_dir, atomic_write_text
from .config import PLTConfig
from .errors import PLTError
from .evaluate import evaluate_targets
from .model import PLTForCausalLM
from .tokenizer import Tokenizer, train_tokenizer


class TrainError(PLTError, ValueError):
    pass


CORPORA = ("stdlib", "chains")
TOKENIZER_PROGRAMS = 4000  # chain programs the tokenizer of a "chains" run is trained on


@dataclass
class Recipe:
    """Everything that determines a trained model (recorded in trainer_state.json)."""

    loops: int = 2
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 352
    vocab_size: int = 4096
    window_left: int = 32  # G-SWA local branch: 33 keys incl. the query, seq_len 256
    # plt_hidden_scale b in u^(r) = a E + b n(h^(r-1)): ~ the embedding RMS, so that loops >= 2
    # start on the scale of loop 1 (b = 1 lets the carry swamp the token embedding)
    hidden_scale: float = 0.03
    max_position_embeddings: int = 2048
    seq_len: int = 256
    batch_size: int = 8  # global, over all ranks
    steps: int = 360
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_tokens: int = 16384
    max_corpus_bytes: int = data.MAX_TOTAL_BYTES
    corpus: str = "stdlib"
    min_depth: int = 1  # chain depths of the "chains" corpus
    max_depth: int = 8

    def validate(self) -> None:
        positive = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "vocab_size", "seq_len",
                    "batch_size", "steps", "eval_every", "eval_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.seq_len > self.max_position_embeddings:
            raise TrainError(f"seq_len {self.seq_len} is longer than max_position_embeddings "
                             f"{self.max_position_embeddings}")
        if self.window_left < 0:
            raise TrainError(f"window_left: must be >= 0, got {self.window_left}")
        if not 0 < self.min_lr <= self.lr:
            raise TrainError(f"learning rates: need 0 < min_lr <= lr, got {self.min_lr}, {self.lr}")
        if self.warmup_steps < 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise TrainError("warmup_steps, weight_decay must be >= 0 and grad_clip > 0")
        if self.corpus not in CORPORA:
            raise TrainError(f"corpus: expected one of {', '.join(CORPORA)}, got {self.corpus!r}")
        if self.corpus == "chains":
            tasks.check_depths(self.depths)

    @property
    def depths(self) -> range:
        return range(self.min_depth, self.max_depth + 1)

    def model_config(self, tokenizer: Tokenizer) -> PLTConfig:
        return PLTConfig(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size, vocab_size=tokenizer.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_ids[0],
            plt_num_loops=self.loops, plt_window_size=[self.window_left, 0],
            plt_hidden_scale=None if self.hidden_scale == 1.0 else self.hidden_scale,
            plt_gate_use_hidden_states=True)


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr to min_lr at `steps`."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- distributed -----------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Dist:
    """Single process, or the process group that `torchrun` describes in the environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise TrainError("--device cuda: this torch build sees no CUDA device")
    if world_size == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
    return Dist(rank, world_size, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def barrier(dist_info: Dist) -> None:
    if dist_info.world_size > 1:
        torch.distributed.barrier()


# ---- corpus preparation (rank 0 writes, others wait) -------------------------------------
@dataclass
class TrainingData:
    tokenizer: Tokenizer
    tokenizer_dir: str
    batches: object  # .batch(step, rank, world_size) -> (inputs, targets)
    validation: tuple[np.ndarray, np.ndarray]  # (inputs, targets) of the validation loss


def prepare_data(run_dir: str, recipe: Recipe, dist_info: Dist,
                 tokenizer_dir: str | None = None) -> TrainingData:
    tokenizer_dir = tokenizer_dir or os.path.join(run_dir, "tokenizer")
    if recipe.corpus == "chains":
        tokenizer = prepare_chains_tokenizer(run_dir, recipe, dist_info, tokenizer_dir)
        validation = tasks.program_windows(
            tokenizer, tasks.programs("validation", recipe.seed, validation_windows(recipe),
                                      recipe.depths), recipe.seq_len)
        batches = tasks.ChainBatches(tokenizer, list(recipe.depths), recipe.seq_len,
                                     recipe.batch_size, recipe.seed)
        return TrainingData(tokenizer, tokenizer_dir, batches, validation)
    tokenizer, tokenizer_dir, train_tokens, val_tokens = prepare_corpus(
        run_dir, recipe, dist_info, tokenizer_dir)
    windows = data.sequential_windows(val_tokens, recipe.seq_len, recipe.eval_tokens)
    batches = data.TokenBatches(train_tokens, recipe.seq_len, recipe.batch_size, recipe.seed)
    return TrainingData(tokenizer, tokenizer_dir, batches, (windows[:, :-1], windows[:, 1:]))


def validation_windows(recipe: Recipe) -> int:
    """Windows of the validation loss: as many as the stdlib corpus's eval_tokens fill."""
    return max(1, recipe.eval_tokens // recipe.seq_len)


def prepare_chains_tokenizer(run_dir: str, recipe: Recipe, dist_info: Dist,
                             tokenizer_dir: str) -> Tokenizer:
    """A small-vocabulary tokenizer trained on chain programs of the train split."""
    if dist_info.is_main and not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.model")):
        text_path = os.path.join(run_dir, "chains-train.txt")
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_text(text_path, "".join(
            p.text + "\n" for p in tasks.programs("train", recipe.seed, TOKENIZER_PROGRAMS,
                                                   recipe.depths)))
        with atomic_dir(tokenizer_dir) as tmp:
            train_tokenizer([text_path], tmp, recipe.vocab_size, {"add_bos_token": False})
    barrier(dist_info)
    return Tokenizer.from_dir(tokenizer_dir)


def prepare_corpus(run_dir: str, recipe: Recipe, dist_info: Dist, tokenizer_dir: str):
    """(tokenizer, train tokens, validation tokens) of the stdlib corpus, trained/encoded once
    per run dir."""
    paths = {split: os.path.join(run_dir, f"tokens-{split}.npy") for split in ("train", "validation")}
    if dist_info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        files = {split: data.corpus_files(split, max_total_bytes=recipe.max_corpus_bytes)
                 for split in paths}
        if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.model")):
            with atomic_dir(tokenizer_dir) as tmp:
                # documents are joined by eos only: no bos in training (HF's add_bos_token)
                train_tokenizer(files["train"], tmp, recipe.vocab_size, {"add_bos_token": False})
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
        for split, path in paths.items():
            if not os.path.exists(path):
                tokens = data.encode_files(tokenizer, files[split], tokenizer.eos_ids[0])
                tmp = path + ".tmp.npy"
                np.save(tmp, tokens, allow_pickle=False)
                os.replace(tmp, path)
    barrier(dist_info)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    tokens = {split: np.load(path, allow_pickle=False) for split, path in paths.items()}
    return tokenizer, tokenizer_dir, tokens["train"], tokens["validation"]


# ---- optimizer state as safetensors (never pickle) ------------------------------------------
def make_optimizer(model: PLTForCausalLM, recipe: Recipe) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8)


def _param_names(model: PLTForCausalLM, optimizer: torch.optim.Optimizer) -> list[str]:
    """Name of each parameter in the optimizer's own index order."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_tensors(model, optimizer) -> dict[str, np.ndarray]:
    state = optimizer.state_dict()["state"]
    tensors = {}
    for index, name in enumerate(_param_names(model, optimizer)):
        for key, value in state.get(index, {}).items():
            tensors[f"{name}::{key}"] = value.detach().cpu().numpy().reshape(value.shape)
    return tensors


def load_optimizer_tensors(model, optimizer, tensors: dict[str, np.ndarray]) -> None:
    state_dict = optimizer.state_dict()
    state = {}
    for index, name in enumerate(_param_names(model, optimizer)):
        entries = {key.split("::", 1)[1]: torch.from_numpy(value.copy())
                   for key, value in tensors.items() if key.split("::", 1)[0] == name}
        if entries:
            state[index] = entries
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


# ---- checkpoints -------------------------------------------------------------------------
def save_checkpoint(ckpt_dir: str, model, optimizer, trainer_state: dict, tokenizer_dir: str):
    with atomic_dir(ckpt_dir) as tmp:
        model.save_pretrained(os.path.join(tmp, "model"), tokenizer_dir=tokenizer_dir)
        save_file(optimizer_tensors(model, optimizer), os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=1)


def load_checkpoint(ckpt_dir: str, recipe: Recipe, device) -> tuple:
    with open(os.path.join(ckpt_dir, "trainer_state.json"), encoding="utf-8") as f:
        trainer_state = json.load(f)
    saved = {**dataclasses.asdict(Recipe()), **trainer_state["recipe"]}  # fields added later
    if saved != dataclasses.asdict(recipe):
        changed = sorted(k for k, v in dataclasses.asdict(recipe).items() if saved[k] != v)
        raise TrainError(f"{ckpt_dir}: cannot resume with a different recipe (changed: "
                         f"{', '.join(changed)}); use a new output directory")
    model = PLTForCausalLM.from_pretrained(os.path.join(ckpt_dir, "model"),
                                           "float32").to(device).train()
    optimizer = make_optimizer(model, recipe)
    load_optimizer_tensors(model, optimizer,
                           load_file(os.path.join(ckpt_dir, "optimizer.safetensors")))
    return model, optimizer, trainer_state


# ---- the loop ------------------------------------------------------------------------------
def language_model_loss(model, inputs: torch.Tensor, targets: torch.Tensor,
                        loops: int) -> torch.Tensor:
    """Cross-entropy of loop L's logits; targets equal to tasks.IGNORE_INDEX carry no loss."""
    logits = model(inputs, loops=loops)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=tasks.IGNORE_INDEX)


def validation_loss(model: PLTForCausalLM, validation, recipe: Recipe) -> float:
    was_training = model.training
    loss = evaluate_targets(model.eval(), *validation, recipe.loops)["loss"]
    model.train(was_training)
    return loss


def train_model(run_dir: str, name: str, recipe: Recipe, dist_info: Dist | None = None,
                tokenizer_dir: str | None = None, stop_after: int | None = None,
                checkpoint_every_s: float = 300.0, log=print) -> dict:
    """Train (or resume) model `name` of `run_dir`; returns its trainer_state.

    `stop_after`: leave after this many steps of this invocation (checkpointed), to be
    resumed later by the same call. The final model goes to {run_dir}/{name}/final.
    """
    recipe.validate()
    dist_info = dist_info or Dist()
    training_data = prepare_data(run_dir, recipe, dist_info, tokenizer_dir)
    tokenizer, tokenizer_dir = training_data.tokenizer, training_data.tokenizer_dir
    ckpt_dir = os.path.join(run_dir, name, "checkpoint")
    final_dir = os.path.join(run_dir, name, "final")
    if os.path.exists(os.path.join(ckpt_dir, "trainer_state.json")):
        model, optimizer, state = load_checkpoint(ckpt_dir, recipe, dist_info.device)
        if dist_info.is_main:
            log(f"{name}: resuming at step {state['step']}/{recipe.steps}")
    else:
        torch.manual_seed(recipe.seed)
        model = PLTForCausalLM(recipe.model_config(tokenizer))
        model.init_weights(seed=recipe.seed)
        model = model.to(dist_info.device).train()
        optimizer = make_optimizer(model, recipe)
        state = {"step": 0, "recipe": dataclasses.asdict(recipe), "train_loss": [],
                 "validation": [], "tokens_seen": 0, "train_seconds": 0.0,
                 "parameters": model.num_parameters(), "world_size": dist_info.world_size}
    if state["step"] >= recipe.steps:
        if dist_info.is_main and not os.path.exists(os.path.join(final_dir, "config.json")):
            model.save_pretrained(final_dir, tokenizer_dir=tokenizer_dir)  # interrupted at the end
        return state

    net = model
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # loop 1 alone never uses the gate parameters
        net = DistributedDataParallel(model, find_unused_parameters=recipe.loops == 1)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dist_info.device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    tokens_per_step = recipe.batch_size * recipe.seq_len
    last_save = time.monotonic()
    end_step = recipe.steps if stop_after is None else min(recipe.steps, state["step"] + stop_after)
    bar = tqdm(total=recipe.steps, initial=state["step"], desc=name, dynamic_ncols=True,
               disable=not dist_info.is_main, mininterval=2.0)
    while state["step"] < end_step:
        step = state["step"]
        t0 = time.perf_counter()
        inputs, targets = (torch.from_numpy(a).long().to(dist_info.device) for a in
                           training_data.batches.batch(step, dist_info.rank, dist_info.world_size))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        with autocast:
            loss = language_model_loss(net, inputs, targets, recipe.loops)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        loss_value = loss.detach()
        if dist_info.world_size > 1:
            torch.distributed.all_reduce(loss_value)
            loss_value /= dist_info.world_size
        elapsed = time.perf_counter() - t0
        state["step"] = step + 1
        state["train_loss"].append(float(loss_value))
        state["tokens_seen"] += tokens_per_step
        state["train_seconds"] += elapsed
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss_value):.3f}", tok_s=f"{tokens_per_step / elapsed:.0f}")
        done = state["step"] == recipe.steps
        if dist_info.is_main and (state["step"] % recipe.eval_every == 0 or done):
            val = validation_loss(model, training_data.validation, recipe)
            state["validation"].append([state["step"], val])
            bar.write(f"{name} step {state['step']}: train {float(loss_value):.4f} "
                      f"validation {val:.4f} lr {lr_at(step, recipe):.2e}")
        if done or state["step"] == end_step or time.monotonic() - last_save > checkpoint_every_s:
            if dist_info.is_main:
                save_checkpoint(ckpt_dir, model, optimizer, state, tokenizer_dir)
            last_save = time.monotonic()
    bar.close()
    if dist_info.is_main and state["step"] == recipe.steps:
        model.save_pretrained(final_dir, tokenizer_dir=tokenizer_dir)
        log(f"{name}: done, {state['tokens_seen']} tokens in {state['train_seconds']:.0f} s -> "
            f"{final_dir}")
    barrier(dist_info)
    return state


def ship_fp16(final_dir: str, out_dir: str) -> None:
    """Copy a trained model as fp16 safetensors (the packaged form), atomically."""
    model = PLTForCausalLM.from_pretrained(final_dir)
    model.save_pretrained(out_dir, dtype=np.float16, tokenizer_dir=final_dir)
