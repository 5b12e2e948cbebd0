"""Training: a few steps lower the loss, resume is bit-exact, DDP (2 gloo processes) matches
one process with the same global batch, and the output is a loadable HF model directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from plt_port import checkpoint
from plt_port.errors import PLTError
from plt_port.evaluate import evaluate_windows
from plt_port.model import PLTForCausalLM
from plt_port.train import Recipe, TrainError, lr_at, train_model

TINY_RECIPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, window_left=7, seq_len=32,
                   batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=1000,
                   eval_tokens=256, max_corpus_bytes=1_000_000)
TRAIN_ARGS = ["--" + k.replace("_", "-") + "=" + str(v) for k, v in TINY_RECIPE.items()]


def recipe(**overrides) -> Recipe:
    return Recipe(**{**TINY_RECIPE, "steps": 8, **overrides})


def quiet(*args):
    pass


def final_tensors(run_dir, name):
    return checkpoint.load_tensors(os.path.join(run_dir, name, "final"))


def test_lr_schedule_warmup_then_cosine():
    r = recipe(steps=100, warmup_steps=10)
    assert lr_at(0, r) == pytest.approx(r.lr / 10)
    assert lr_at(9, r) == pytest.approx(r.lr)
    assert lr_at(55, r) == pytest.approx((r.lr + r.min_lr) / 2)
    assert lr_at(100, r) == pytest.approx(r.min_lr)


def test_few_steps_lower_the_loss_and_save_a_loadable_model(tmp_path, tokenizer_dir):
    r = recipe(steps=30, eval_every=30)
    state = train_model(str(tmp_path), "m", r, tokenizer_dir=tokenizer_dir, log=quiet)
    losses = state["train_loss"]
    assert len(losses) == 30 and state["step"] == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    # the saved model, reloaded, reproduces the logged validation loss independently
    final = os.path.join(tmp_path, "m", "final")
    model = PLTForCausalLM.from_pretrained(final)
    assert model.config.plt_num_loops == 2 and model.config.gate_uses_hidden
    assert model.config.window == 8
    val_tokens = np.load(os.path.join(tmp_path, "tokens-validation.npy"))
    from plt_port.data import sequential_windows

    windows = sequential_windows(val_tokens, r.seq_len, r.eval_tokens)
    assert evaluate_windows(model, windows, 2)["loss"] == pytest.approx(
        state["validation"][-1][1], rel=1e-5)
    initial = PLTForCausalLM(model.config)
    initial.init_weights(seed=r.seed)
    assert state["validation"][-1][1] < evaluate_windows(initial.eval(), windows, 2)["loss"] - 0.5
    with open(os.path.join(final, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "iquestpltcoder"
    assert config["plt_gate_use_hidden_states"] is True
    assert set(os.listdir(final)) >= {"config.json", "model.safetensors", "tokenizer.model",
                                      "tokenizer_config.json"}


def test_resume_continues_bit_exactly(tmp_path, tokenizer_dir):
    straight = train_model(str(tmp_path / "a"), "m", recipe(loops=3), tokenizer_dir=tokenizer_dir,
                           log=quiet)
    first = train_model(str(tmp_path / "b"), "m", recipe(loops=3), tokenizer_dir=tokenizer_dir,
                        stop_after=3, log=quiet)
    assert first["step"] == 3 and not os.path.exists(tmp_path / "b" / "m" / "final")
    resumed = train_model(str(tmp_path / "b"), "m", recipe(loops=3), tokenizer_dir=tokenizer_dir,
                          log=quiet)
    assert resumed["train_loss"] == straight["train_loss"]  # exact float equality
    a, b = final_tensors(tmp_path / "a", "m"), final_tensors(tmp_path / "b", "m")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_recipe(tmp_path, tokenizer_dir):
    train_model(str(tmp_path), "m", recipe(), tokenizer_dir=tokenizer_dir, stop_after=1, log=quiet)
    with pytest.raises(TrainError, match="lr"):
        train_model(str(tmp_path), "m", recipe(lr=1e-3), tokenizer_dir=tokenizer_dir, log=quiet)


def run_cli(args, env=None, launcher=()):
    cmd = [*launcher, "-m", "plt_port.app.cli", "train", *args] if launcher else \
        [sys.executable, "-m", "plt_port.app.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})},
                          cwd=os.path.dirname(os.path.dirname(__file__)))


def test_ddp_two_gloo_processes_match_one_process(tmp_path, tokenizer_dir):
    common = [*TRAIN_ARGS, "--steps=4", "--loops", "1", "2", "--tokenizer", tokenizer_dir,
              "--threads=1", "--device=cpu"]
    single = run_cli(["--out", str(tmp_path / "single"), *common])
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    ddp = run_cli(["--out", str(tmp_path / "ddp"), *common], launcher=torchrun,
                  env={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for loops in (1, 2):
        name = f"plt-stdlib-L{loops}"
        states = [json.load(open(tmp_path / run / name / "checkpoint" / "trainer_state.json"))
                  for run in ("single", "ddp")]
        assert states[1]["world_size"] == 2
        np.testing.assert_allclose(states[1]["train_loss"], states[0]["train_loss"], rtol=1e-5)
        a, b = final_tensors(tmp_path / "single", name), final_tensors(tmp_path / "ddp", name)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-3, atol=1e-5, err_msg=key)


def test_cli_rejects_bad_loop_counts(tmp_path, capsys):
    from plt_port.app.cli import main

    assert main(["train", "--out", str(tmp_path), "--loops", "0"]) == 1
    assert "--loops" in capsys.readouterr().err


def test_recipe_hidden_scale_reaches_the_config(tokenizer_dir):
    from plt_port.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    assert recipe(hidden_scale=0.1).model_config(tokenizer).hidden_scale == 0.1
    assert recipe(hidden_scale=1.0).model_config(tokenizer).plt_hidden_scale is None  # SPEC default


def test_recipe_validation():
    with pytest.raises(PLTError, match="min_lr"):
        recipe(min_lr=1.0).validate()
    with pytest.raises(PLTError, match="seq_len"):
        recipe(seq_len=0).validate()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 autocast training path needs a CUDA device")
def test_cuda_bf16_training_lowers_the_loss(tmp_path, tokenizer_dir):
    from plt_port.train import Dist

    state = train_model(str(tmp_path), "m", recipe(steps=30), Dist(device=torch.device("cuda")),
                        tokenizer_dir=tokenizer_dir, log=quiet)
    assert np.mean(state["train_loss"][-5:]) < np.mean(state["train_loss"][:5]) - 0.5
