"""The formats users bring: tokenizer.json, generation_config.json, mlx-lm quantized
checkpoints, plt-port's MLX exports in stock mlx-lm, and `plt-port info`."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import random_prompts, requires, write_fast_tokenizer
from plt_port.generation_config import GenerationConfig, GenerationConfigError
from plt_port.quantization import Quantization, QuantizationError
from plt_port.tokenizer import FastTokenizer, Tokenizer, TokenizerError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "x = '🐍中文é'  # ✓\n\tdone\n<|im_end|> ok"


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "plt_port.app.cli", *args], capture_output=True,
                          env=env, cwd=cwd, timeout=300)


# ---- tokenizer.json ------------------------------------------------------------------------
@pytest.mark.parametrize("byte_level", [True, False], ids=["byte-level", "byte-fallback"])
def test_fast_tokenizer_round_trips_and_streams_whole_characters(tmp_path, byte_level):
    tok = Tokenizer.from_dir(write_fast_tokenizer(tmp_path, added={600: "<|im_end|>"},
                                                  byte_level=byte_level))
    assert isinstance(tok, FastTokenizer) and tok.eos_ids == [2] and tok.bos_id == 1
    ids = tok.encode(TEXT)
    assert 600 in ids and tok.decode(ids) == TEXT
    stream = tok.detokenizer()
    deltas = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == TEXT and not any("\ufffd" in d for d in deltas)


def test_sentencepiece_model_wins_over_tokenizer_json(tokenizer_dir, tmp_path):
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    write_fast_tokenizer(tmp_path / "fast")
    shutil.copy(tmp_path / "fast" / "tokenizer.json", tmp_path / "t")
    assert not isinstance(Tokenizer.from_dir(tmp_path / "t"), FastTokenizer)


def test_tokenizer_larger_than_the_model_vocabulary_is_one_error(tmp_path):
    tok = Tokenizer.from_dir(write_fast_tokenizer(tmp_path, added={700: "<|x|>"}))
    with pytest.raises(TokenizerError, match="701 tokens, more than the model's vocab_size 512"):
        tok.check_fits(512)


# ---- generation_config.json ----------------------------------------------------------------
def test_generation_config_sampling_defaults():
    greedy = GenerationConfig.from_dict({"temperature": 0.7, "repetition_penalty": 1.1,
                                         "eos_token_id": [2, 7]})
    assert greedy.eos_token_ids == [2, 7]
    assert greedy.sampling_defaults() == {"temperature": 0.0, "repetition_penalty": 1.1}
    sampled = GenerationConfig.from_dict({"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                          "top_k": 20})
    assert sampled.sampling_defaults() == {"temperature": 0.7, "top_p": 0.9, "top_k": 20}

    from runtimes.sampling import resolve_sampling

    params = resolve_sampling(sampled.sampling_defaults(), temperature=0.2, top_k=None)
    assert (params.temperature, params.top_k, params.top_p) == (0.2, 20, 0.9)


@pytest.mark.parametrize("data, name", [({"temperature": "hot"}, "temperature"),
                                        ({"do_sample": 1}, "do_sample"),
                                        ({"top_k": 2.5}, "top_k"),
                                        ({"eos_token_id": [2, "x"]}, "eos_token_id")])
def test_generation_config_wrong_type_is_one_error(data, name):
    with pytest.raises(GenerationConfigError, match=f"field '{name}'"):
        GenerationConfig.from_dict(data)


def test_tokenizer_json_model_and_generation_config_eos_through_cli(make_model, tmp_path):
    """A model with tokenizer.json only: `plt-port generate` encodes with it, and the eos id
    of generation_config.json (the first greedy token here) ends generation at once."""
    model_dir = make_model("plt")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        os.remove(os.path.join(model_dir, name))
    write_fast_tokenizer(model_dir, vocab_size=400)
    prompt = "def f(x):\n    "
    tok = Tokenizer.from_dir(model_dir)
    from runtimes.backends import load_backend
    from runtimes.generate import generate

    _, last = generate(load_backend("torch", model_dir), tok, prompt, max_new_tokens=1)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [last.token], "do_sample": True, "temperature": 0.5}, f)
    stopped = cli("generate", "--model", model_dir, "--max-new-tokens", "4",
                  "--temperature", "0", prompt)
    assert stopped.returncode == 0, stopped.stderr.decode()
    assert b"generation: 1 tokens" in stopped.stderr and b"finish: stop" in stopped.stderr

    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"top_k": "many"}, f)
    bad = cli("generate", "--model", model_dir, prompt)
    assert bad.returncode == 1 and bad.stderr.count(b"\n") == 1
    assert b"generation_config.json field 'top_k'" in bad.stderr


# ---- mlx-lm quantized checkpoints and stock mlx-lm -----------------------------------------
def greedy_plt_port(model_dir, prompt, steps):
    from runtimes.backends.mlx_backend import MLXBackend

    backend = MLXBackend(str(model_dir))
    state, logits = backend.prefill([prompt], len(prompt) + steps)
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits.argmax(-1)[0]))
        logits = backend.step(state, np.array(tokens[-1:]))
    return tokens


def greedy_mlx_lm(model_dir, prompt, steps, trust_remote_code=False):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_dir), trust_remote_code=trust_remote_code)
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=steps)], model


@requires("mlx_lm")
def test_v1_quantized_by_mlx_lm_decodes_as_in_mlx_lm(make_model, tmp_path):
    """mlx-lm's own quantizer on a v1 model (4-bit, one module at 8 bits, mlx-lm's
    iquestloopcoder class): plt-port's MLX backend loads the directory as it is."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(Path(make_model("v1", intermediate_size=128)))
    mixed = {"model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8, "mode": "affine"}}
    model, config = quantize_model(model, config, 64, 4,
                                   quant_predicate=lambda path, _: mixed.get(path, True))
    out = tmp_path / "v1-4bit"
    save_model(out, model)
    save_config(config, out / "config.json")
    prompt = random_prompts([9], seed=1)[0]
    theirs, model = greedy_mlx_lm(out, prompt, 20)
    assert type(model).__module__ == "mlx_lm.models.iquestloopcoder"
    assert greedy_plt_port(out, prompt, 20) == theirs


@requires("mlx_lm")
@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_plt_port_mlx_export_decodes_the_same_in_stock_mlx_lm(make_model, tmp_path, fmt):
    """PLT exports carry their model file (trust_remote_code); v1 exports load with mlx-lm's
    own iquestloopcoder, no remote code."""
    from exporters.mlx_export import export

    out = export(make_model(fmt), tmp_path / "mlx")
    prompt = random_prompts([9], seed=2)[0]
    theirs, model = greedy_mlx_lm(out, prompt, 24, trust_remote_code=fmt == "plt")
    assert type(model).__module__ == ("custom_model" if fmt == "plt"
                                      else "mlx_lm.models.iquestloopcoder")
    assert greedy_plt_port(out, prompt, 24) == theirs


def test_mlx_model_file_needs_only_mlx_and_numpy():
    from exporters.mlx_model_file import model_file_source

    tree = ast.parse(model_file_source())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported <= {"mlx", "numpy", "os", "json", "math", "stat", "dataclasses", "typing",
                        "functools", "pathlib"}, imported
    assert "gswa_decode" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("entry, match", [
    ({"group_size": 64, "bits": 4, "mode": "mxfp9"}, "mode 'mxfp9' is not supported"),
    ({"group_size": 48, "bits": 4}, "group_size must be one of"),
    ({"group_size": 64, "bits": 4, "model.layers.0.mlp.down_proj": {"bits": 7,
                                                                     "group_size": 64}},
     r"\['model.layers.0.mlp.down_proj'\]: bits"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
])
def test_bad_quantization_entries_are_one_error(entry, match):
    with pytest.raises(QuantizationError, match=match):
        Quantization.from_config({"quantization": entry})


def test_group_size_that_does_not_divide_and_kept_modules_are_errors():
    quant = Quantization.from_config({"quantization_config": {
        "group_size": 64, "bits": 4, "lm_head": False}})
    with pytest.raises(QuantizationError, match="group size 64 does not divide its input "
                                                "size 96"):
        quant.default.packed_shapes((64, 96), "model.layers.0.mlp.down_proj")
    with pytest.raises(QuantizationError, match="keeps it unquantized"):
        quant.plan({"lm_head.weight": (512, 64)}, {"lm_head.scales"})


@requires("mlx")
def test_mis_shaped_quantized_tensor_is_one_error(make_model, tmp_path):
    import mlx.core as mx

    from exporters.mlx_export import export
    from plt_port.checkpoint import CheckpointError
    from runtimes.backends.mlx_backend import MLXBackend

    out = export(make_model("plt"), tmp_path / "q", quantize=4, group_size=32)
    path = os.path.join(out, "model.safetensors")
    weights = mx.load(path)
    weights["model.layers.0.mlp.up_proj.scales"] = weights["model.layers.0.mlp.up_proj.scales"][:, :1]
    mx.save_safetensors(path, weights)
    with pytest.raises(CheckpointError, match=r"mis-shaped: model.layers.0.mlp.up_proj.scales "
                                              r"is \[96, 1\], expected \[96, 2\]"):
        MLXBackend(out)


# ---- plt-port info -------------------------------------------------------------------------
def test_info_from_a_config_json_path(make_model):
    from plt_port.checkpoint import parameter_count
    from plt_port.config import PLTConfig

    model_dir = make_model("v1", head_dim=32)
    result = cli("info", os.path.join(model_dir, "config.json"), "--context", "1000",
                 "--loops", "3", "--batch", "2")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    count = parameter_count(PLTConfig.from_file(model_dir))
    assert f"{count:,} parameters" in out
    assert "global 1,000 + 2 x 8 ring slots per layer;" in out
    assert "| mlx backend, 4-bit |" in out and "| onnx backend, float32 (CPU) |" in out
    assert "| mlx backend, 4-bit, KV 8-bit |" in out and "| 4-bit |" in out
    assert "0.00 GiB" not in out and " KiB |" in out  # a tiny model in units that read right


def test_info_rings_are_no_longer_than_the_context(make_model):
    result = cli("info", make_model("v1", loop_window_size=8192), "--context", "300")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "global 300 + 1 x 300 ring slots per layer;" in out
    assert "no KV quantization: group 16 does not fit the head dim 16" in out  # tiny heads


@requires("onnx")
@pytest.mark.parametrize("fmt,overrides,dtype,quant", [
    ("plt", {}, "float32", None), ("plt", dict(tie_word_embeddings=True), "float16", None),
    ("plt", dict(tie_word_embeddings=True), "float32", (4, 32, True)),
    ("v1", {}, "float32", (8, 64, False)), ("plt", dict(intermediate_size=100), "float32",
                                             (4, 128, True))])
def test_onnx_weight_bytes_are_those_the_exporter_writes(make_model, tmp_path, fmt, overrides,
                                                         dtype, quant):
    """info sizes ONNX exports from the exporter's own layout (block size, fp32 scales, fp16
    embedding, page alignment): the bytes equal the weights.bin an export writes."""
    from exporters.onnx_export import export, quantization
    from exporters.onnx_layout import weights_file_bytes
    from plt_port.config import PLTConfig

    model_dir = make_model(fmt, **overrides)
    quant = quantization(*quant) if quant else None
    out = export(model_dir, tmp_path / "onnx", dtype=dtype, quant=quant)
    expected = weights_file_bytes(PLTConfig.from_file(model_dir), dtype, quant)
    assert os.path.getsize(os.path.join(out, "weights.bin")) == expected


def test_human_bytes_picks_the_unit():
    from plt_port.sizing import human_bytes

    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 * 1024, 3 * 2**30, 2**42)] == \
        ["0 B", "1,023 B", "1.00 KiB", "1.50 MiB", "3.00 GiB", "4,096.00 GiB"]
