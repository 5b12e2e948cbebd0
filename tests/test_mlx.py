"""MLX exporter, model and backend against the PyTorch reference (plt_port/model.py).

The reference recomputes the full sequence with no cache, so every comparison checks the MLX
caches (global, ring, CLP carry), chunked prefill and right-padded batches independently.
Tests need mlx (mlx[cpu] on Linux); the Metal-kernel parity test needs an Apple GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import greedy_run, random_prompts, reference_logits, requires
from plt_port import family as models

pytestmark = requires("mlx")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


@pytest.fixture(autouse=True)
def export_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLT_PORT_CACHE", str(tmp_path / "cache"))


# ---- parity with PyTorch -----------------------------------------------------------------
def test_full_forward_matches_pytorch(make_model):
    import mlx.core as mx

    from runtimes.backends.mlx_backend import load_model
    from exporters.mlx_export import export

    path = make_model("plt", plt_num_loops=3)
    model = load_model(export(path, os.path.join(path, "..", "exported")))
    seqs = random_prompts([17, 17], seed=3)
    got = np.array(model(mx.array(seqs)))
    expected = np.stack(reference_logits(path, seqs, 3))
    assert np.abs(got - expected).max() <= TOL


def test_clp_naive_compiled_and_eager_agree_and_cache_grows_past_capacity(make_model):
    from runtimes.backends.mlx_backend import MLXBackend

    backend = MLXBackend(make_model("plt", plt_num_loops=3))
    prompts = random_prompts([6, 3], seed=4)
    runs = {}
    for mode, compiled in (("clp", True), ("naive", True), ("clp", False)):
        backend.model.compile_step = compiled
        state, logits = backend.prefill(prompts, max_tokens=8)  # grows during decoding
        capacity = state.capacity
        history = []
        for token in range(10, 22):
            history.append(logits)
            logits = backend.step(state, np.array([token, token + 1]), mode=mode)
        assert capacity == 8 and state.capacity == 256
        assert backend.cache_bytes(state) == backend.expected_cache_bytes(2, state.capacity, 4)
        runs[mode, compiled] = np.stack(history)
    assert np.abs(runs["clp", True] - runs["naive", True]).max() <= 1e-5
    assert np.abs(runs["clp", True] - runs["clp", False]).max() <= 1e-5


# ---- greedy tokens -----------------------------------------------------------------------
def assert_64_greedy_tokens_identical(model_dir, prompt, loops=None):
    """MLX's 64 greedy tokens are PyTorch's: each is the argmax of the reference logits after
    the tokens before it (so a PyTorch greedy run would pick the same sequence)."""
    from runtimes.backends.mlx_backend import MLXBackend

    sequences, _, _ = greedy_run(MLXBackend(model_dir, loops=loops), [prompt], 64)
    generated = sequences[0][len(prompt):]
    reference = reference_logits(model_dir, sequences, loops)[0][len(prompt) - 1:-1]
    assert generated == reference.argmax(-1).tolist()


@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_64_greedy_tokens_identical_to_pytorch_random_model(make_model, fmt):
    assert_64_greedy_tokens_identical(make_model(fmt), random_prompts([12], seed=5)[0])


@pytest.mark.parametrize("name", models.FAMILY)
def test_64_greedy_tokens_identical_to_pytorch_embedded_model(name):
    from plt_port.tokenizer import Tokenizer

    path = models.model_dir(name)
    prompt = Tokenizer.from_dir(path).encode("def fibonacci(n):\n    ", add_bos=True)
    assert_64_greedy_tokens_identical(path, prompt)


# ---- export ------------------------------------------------------------------------------
def dequantized_tensors(weights, group_size, bits):
    """Numpy fp32 tensors under HF names: quantized modules dequantized with mx.dequantize."""
    import mlx.core as mx

    tensors = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name[:-len(".weight")]
        if f"{module}.scales" in weights:
            value = mx.dequantize(value, weights[f"{module}.scales"], weights[f"{module}.biases"],
                                  group_size=group_size, bits=bits)
        tensors[name] = np.array(value.astype(mx.float32))
    return tensors


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_export_matches_pytorch_on_dequantized_weights(make_model, tmp_path, bits):
    """Quantized matmuls/embedding == the reference model run on the dequantized weights."""
    import mlx.core as mx
    import torch

    from exporters.mlx_export import export
    from plt_port.config import PLTConfig
    from plt_port.model import PLTForCausalLM
    from runtimes.backends.mlx_backend import MLXBackend

    path = make_model("plt", tie_word_embeddings=True)
    out = export(path, tmp_path / f"q{bits}", quantize=bits, group_size=32)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    assert "mlx_export" in config and os.path.exists(os.path.join(out, "tokenizer.model"))
    weights = mx.load(os.path.join(out, "model.safetensors"))
    assert weights["model.embed_tokens.weight"].dtype == mx.uint32
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.uint32
    assert "model.layers.0.self_attn.plt_gate.scales" not in weights
    assert weights["model.layers.0.self_attn.plt_gate.weight"].dtype == mx.float32

    prompts = random_prompts([12, 7], seed=6)
    sequences, history, _ = greedy_run(MLXBackend(out), prompts, 8)
    reference = PLTForCausalLM.from_tensors(PLTConfig.from_file(path),
                                            dequantized_tensors(weights, 32, bits))
    with torch.no_grad():
        for b, (seq, prompt) in enumerate(zip(sequences, prompts)):
            expected = reference(torch.tensor([seq]))[0, len(prompt) - 1:len(prompt) + 8].numpy()
            assert np.abs(np.stack([h[b] for h in history]) - expected).max() <= TOL
    _, fp32_logits = MLXBackend(path).prefill(prompts, 16)
    assert np.abs(history[0] - fp32_logits).max() > 10 * TOL  # the weights really changed


def test_export_bfloat16_stores_bfloat16(make_model, tmp_path):
    import mlx.core as mx

    from exporters.mlx_export import export
    from runtimes.backends.mlx_backend import MLXBackend

    out = export(make_model("v1"), tmp_path / "bf16", dtype="bfloat16")
    assert mx.load(os.path.join(out, "model.safetensors"))["model.norm.weight"].dtype == mx.bfloat16
    assert MLXBackend(out).run_dtype == "bfloat16"


def test_export_cli_and_bad_options(make_model, tmp_path, capsys):
    from exporters.mlx_export import ExportError, export
    from plt_port.app.cli import main

    path = make_model("plt")
    out = tmp_path / "cli-out"
    assert main(["export", "mlx", path, str(out), "--dtype", "float16"]) == 0
    with open(out / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "float16"
    with pytest.raises(ExportError, match="group size"):
        export(path, tmp_path / "bad", quantize=4, group_size=48)
    with pytest.raises(ExportError, match="already an MLX export"):
        export(str(out), tmp_path / "again")
    with pytest.raises(SystemExit):  # argparse refuses bits outside {4, 8}
        main(["export", "mlx", path, str(tmp_path / "x"), "--quantize", "3"])


def test_failed_export_leaves_target_untouched(make_model, tmp_path):
    from plt_port.checkpoint import CheckpointError
    from exporters.mlx_export import export

    path = make_model("plt")
    out = tmp_path / "target"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = 3  # the checkpoint has 2: strict load fails
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="missing"):
        export(path, out)
    assert os.listdir(out) == ["keep.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".target")]


# ---- backend surface ---------------------------------------------------------------------
def test_backend_errors(make_model):
    from runtimes.backends import load_backend
    from runtimes.backends.base import BackendError

    import mlx.core as mx

    path = make_model("plt")
    backend = load_backend("mlx", path, loops=2)
    state, _ = backend.prefill([[1, 2, 3]], 8)
    with pytest.raises(BackendError, match="one integer token per sequence"):
        backend.step(state, np.array([1, 2]))
    with pytest.raises(BackendError, match="vocabulary"):
        backend.step(state, np.array([512]))
    with pytest.raises(BackendError, match="decode mode"):
        backend.step(state, np.array([1]), mode="fast")
    with pytest.raises(BackendError, match="kernel"):
        load_backend("mlx", path, kernel="maybe")
    if not mx.metal.is_available():
        with pytest.raises(BackendError, match="Metal"):
            load_backend("mlx", path, kernel="on")
    assert backend.peak_memory_bytes() > 0


def test_backend_imports_and_runs_without_torch(make_model):
    path = make_model("plt")
    code = (
        "import sys\n"
        "from runtimes.backends.mlx_backend import MLXBackend\n"
        "import numpy as np\n"
        f"b = MLXBackend({path!r}, loops=3)\n"
        "state, logits = b.prefill([[1, 2, 3]], 8)\n"
        "b.step(state, logits.argmax(-1))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_generate_api_runs_mlx(make_model, tokenizer_dir):
    generate = pytest.importorskip("runtimes.generate")
    from plt_port.tokenizer import Tokenizer
    from runtimes.backends.mlx_backend import MLXBackend

    path = make_model("plt")
    backend = MLXBackend(path)
    tokenizer = Tokenizer.from_dir(path)
    responses = list(generate.stream_generate(backend, tokenizer, "def f(x):", max_new_tokens=8))
    last = responses[-1]
    assert last.backend == "mlx" and last.decode_mode == "clp" and last.finish_reason
    assert last.cache_bytes > 0 and last.peak_memory_bytes > 0


def metal_available() -> bool:
    try:
        import mlx.core as mx
    except ImportError:
        return False
    return mx.metal.is_available()


@pytest.mark.skipif(not metal_available(),
                    reason="the Metal G-SWA kernel needs an Apple GPU (mx.metal.is_available() "
                           "is False here)")
def test_metal_kernel_matches_composed_ops(make_model):
    from runtimes.backends.mlx_backend import MLXBackend

    path = make_model("plt", plt_num_loops=3)
    prompts = random_prompts([21, 13], seed=8)
    _, on, _ = greedy_run(MLXBackend(path, kernel="on"), prompts, 16)
    _, off, _ = greedy_run(MLXBackend(path, kernel="off"), prompts, 16)
    assert np.abs(np.stack(on) - np.stack(off)).max() <= TOL


def test_agreement_report(make_model):
    from runtimes.precision import agreement

    results = agreement(make_model("plt"), random_prompts([6], seed=10)[0], steps=6,
                        variants=("fp16", "q4"), group_size=32)
    assert set(results) == {"fp16", "q4"}
    for row in results.values():
        assert 0 <= row["identical_greedy"] <= 1 and row["mean_kl"] >= 0
        assert 0 <= row["free_run_identical_prefix"] <= 6
    assert results["fp16"]["mean_kl"] < results["q4"]["mean_kl"]


def test_quantization_skips_layers_whose_input_the_group_size_does_not_divide(make_model,
                                                                             tmp_path):
    """Group size 64 on the tiny model: down_proj (input 96) stays float, the other linears
    (input 64) and the embedding are packed."""
    import mlx.core as mx

    from exporters.mlx_export import export

    out = export(make_model("plt"), tmp_path / "q4", quantize=4, group_size=64)
    weights = mx.load(os.path.join(out, "model.safetensors"))
    layer = "model.layers.0"
    assert f"{layer}.mlp.down_proj.scales" not in weights
    assert weights[f"{layer}.mlp.down_proj.weight"].dtype == mx.float32
    for name in (f"{layer}.mlp.up_proj", f"{layer}.self_attn.q_proj", "model.embed_tokens"):
        assert weights[f"{name}.weight"].dtype == mx.uint32 and f"{name}.scales" in weights
