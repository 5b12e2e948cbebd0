"""plt-port generate: streamed text on stdout, stats on stderr, one-line errors."""

from __future__ import annotations

import io
import json
import os

import pytest

from plt_port.app.cli import main
from plt_port.tokenizer import Tokenizer
from runtimes.backends import load_backend
from runtimes.generate import generate
from runtimes.sampling import SamplingParams


def test_streams_the_same_text_as_generate(make_model, capsys):
    model_dir = make_model("plt", eos_token_id=None)
    assert main(["generate", "--model", model_dir, "--loops", "3", "--decode", "naive",
                 "--max-new-tokens", "9", "--temp", "0.7", "--top-k", "20", "--seed", "5",
                 "--threads", "1", "def f():"]) == 0
    captured = capsys.readouterr()
    expected, _ = generate(load_backend("torch", model_dir, loops=3), Tokenizer.from_dir(model_dir),
                           "def f():", max_new_tokens=9, decode_mode="naive",
                           sampling=SamplingParams(temperature=0.7, top_k=20, seed=5))
    assert captured.out == expected + "\n"
    assert "[torch, loops=3, decode=naive] prompt:" in captured.err
    assert "generation: 9 tokens" in captured.err and "finish: length" in captured.err


def test_stdin_prompt_and_sequential_fallback_is_reported(make_model, capsys, monkeypatch):
    model_dir = make_model("v1", eos_token_id=None)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"x = 1\n")))
    assert main(["generate", "--model", model_dir, "--max-new-tokens", "2", "-"]) == 0
    assert "decode=naive (clp needs a PLT checkpoint and loops >= 2)" in capsys.readouterr().err


@pytest.mark.parametrize("flags,config_bos,expected_bos", [([], None, True), ([], False, False),
                                                           (["--no-bos"], None, False)])
def test_bos_follows_tokenizer_config_and_flag(make_model, capsys, flags, config_bos,
                                               expected_bos):
    model_dir = make_model("plt", eos_token_id=None)
    if config_bos is not None:
        path = os.path.join(model_dir, "tokenizer_config.json")
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump({**config, "add_bos_token": config_bos}, f)
    assert main(["generate", "--model", model_dir, "--max-new-tokens", "1", *flags, "x = 1"]) == 0
    prompt_tokens = len(Tokenizer.from_dir(model_dir).encode("x = 1", add_bos=expected_bos))
    assert f"prompt: {prompt_tokens} tokens" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--model", "{missing}", "x"], "no such model directory"),
    (["--loops", "0", "x"], "loops: must be an integer in 1..8"),
    (["--loops", "9", "x"], "loops: must be an integer in 1..8"),
    ([""], "the prompt is empty"),
    (["--backend", "tpu", "x"], "unknown backend 'tpu'"),
    (["--max-new-tokens", "0", "x"], "max_new_tokens must be a positive integer"),
    (["--top-p", "0", "x"], "top_p"),
])
def test_errors_are_one_line_without_traceback(make_model, capsys, argv, message):
    model_dir = make_model("plt")
    argv = [a.replace("{missing}", model_dir + "-missing") for a in argv]
    if "--model" not in argv:
        argv = ["--model", model_dir] + argv
    assert main(["generate"] + argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("plt-port generate: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
