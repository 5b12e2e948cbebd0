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

from conftest import requires, tiny_config
from plt_port import family as models
from plt_port.random_model import save_random_model

pytestmark = requires("mlx")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


@pytest.fixture(autouse=True)
def export_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLT_PORT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_dir(tmp_path, tokenizer_dir):
    """model_dir(fmt, **overrides): a tiny random model with weights large enough (std 0.1)
    that loops, gates and the window change the logits far beyond the tolerance."""
    def make(fmt="plt", seed=0, **overrides):
        path = tmp_path / f"{fmt}-{seed}-{len(os.listdir(tmp_path))}"
        return save_random_model(path, tiny_config(fmt, **overrides), seed, tokenizer_dir, std=0.1)
    return make


def reference_logits(model_dir, sequences, loops):
    """Logits [T, V] at every position of each sequence, from the PyTorch reference model."""
    import torch

    from plt_port.model import PLTForCausalLM

    model = PLTForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return [model(torch.tensor([seq]), loops=loops)[0].numpy() for seq in sequences]


def greedy_decode(backend, prompts, steps, mode="clp", chunk_size=None):
    """Greedy decoding; returns the full sequences and the logits of prefill and of every step:
    history[s] [B, V] (s = 0..steps) predicts the token at position len(prompt) + s."""
    state, logits = backend.prefill(prompts, max(map(len, prompts)) + steps,
                                    chunk_size=chunk_size)
    sequences, history = [list(p) for p in prompts], []
    for _ in range(steps):
        history.append(logits)
        tokens = logits.argmax(-1)
        for seq, token in zip(sequences, tokens):
            seq.append(int(token))
        logits = backend.step(state, tokens, mode=mode)
    history.append(logits)
    return sequences, history, state


def random_prompts(seed, lengths, vocab=512):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, n)] for n in lengths]


# ---- parity with PyTorch -----------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_logits_match_pytorch_prefill_and_32_decode_steps(model_dir, fmt):
    from runtimes.mlx_backend import MLXBackend

    path = model_dir(fmt)
    prompts = random_prompts(1, [19, 11])  # longer than the window (8 keys), different lengths
    for loops in (1, 2, 3, 4):
        backend = MLXBackend(path, loops=loops)
        for mode, chunk_size in (("clp", None), ("naive", 5)):
            sequences, history, _ = greedy_decode(backend, prompts, 32, mode, chunk_size)
            reference = reference_logits(path, sequences, loops)
            for b, prompt in enumerate(prompts):
                expected = reference[b][len(prompt) - 1:len(prompt) + 32]
                got = np.stack([step[b] for step in history])
                diff = np.abs(got - expected).max()
                assert diff <= TOL, (fmt, loops, mode, b, diff)


@pytest.mark.parametrize("overrides", [
    dict(plt_gate_use_hidden_states=False, tie_word_embeddings=True),
    dict(plt_normalize_per_loop=False, plt_emb_scale=0.5, plt_hidden_scale=2.0),
], ids=["query-gate-tied", "no-norm-scaled"])
def test_logits_match_pytorch_config_variants(model_dir, overrides):
    from runtimes.mlx_backend import MLXBackend

    path = model_dir("plt", plt_num_loops=3, **overrides)
    prompts = random_prompts(9, [14, 10])
    for mode in ("clp", "naive"):
        sequences, history, _ = greedy_decode(MLXBackend(path), prompts, 12, mode, chunk_size=4)
        reference = reference_logits(path, sequences, 3)
        for b, prompt in enumerate(prompts):
            expected = reference[b][len(prompt) - 1:len(prompt) + 12]
            assert np.abs(np.stack([h[b] for h in history]) - expected).max() <= TOL


def test_loops_gates_and_window_matter_beyond_tolerance(model_dir):
    """Guards the parity test: the things it checks change the logits by >> TOL."""
    path = model_dir("plt")
    seq = random_prompts(2, [24])
    one, two = reference_logits(path, seq, 1)[0], reference_logits(path, seq, 2)[0]
    assert np.abs(one - two).max() > 100 * TOL
    wide = model_dir("plt", plt_window_size=[15, 0])
    assert np.abs(reference_logits(wide, seq, 2)[0] - two).max() > 100 * TOL


def test_full_forward_matches_pytorch(model_dir):
    import mlx.core as mx

    from runtimes.mlx_model import load_model
    from exporters.mlx_export import export

    path = model_dir("plt", plt_num_loops=3)
    model = load_model(export(path, os.path.join(path, "..", "exported")))
    seqs = random_prompts(3, [17, 17])
    got = np.array(model(mx.array(seqs)))
    expected = np.stack(reference_logits(path, seqs, 3))
    assert np.abs(got - expected).max() <= TOL


def test_clp_naive_compiled_and_eager_agree_and_cache_grows_past_capacity(model_dir):
    from runtimes.mlx_backend import MLXBackend

    backend = MLXBackend(model_dir("plt", plt_num_loops=3))
    prompts = random_prompts(4, [6, 3])
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
    from runtimes.mlx_backend import MLXBackend

    sequences, _, _ = greedy_decode(MLXBackend(model_dir, loops=loops), [prompt], 64)
    generated = sequences[0][len(prompt):]
    reference = reference_logits(model_dir, sequences, loops)[0][len(prompt) - 1:-1]
    assert generated == reference.argmax(-1).tolist()


@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_64_greedy_tokens_identical_to_pytorch_random_model(model_dir, fmt):
    assert_64_greedy_tokens_identical(model_dir(fmt), random_prompts(5, [12])[0])


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
def test_quantized_export_matches_pytorch_on_dequantized_weights(model_dir, tmp_path, bits):
    """Quantized matmuls/embedding == the reference model run on the dequantized weights."""
    import mlx.core as mx
    import torch

    from exporters.mlx_export import export
    from plt_port.config import PLTConfig
    from plt_port.model import PLTForCausalLM
    from runtimes.mlx_backend import MLXBackend

    path = model_dir("plt", tie_word_embeddings=True)
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

    prompts = random_prompts(6, [12, 7])
    sequences, history, _ = greedy_decode(MLXBackend(out), prompts, 8)
    reference = PLTForCausalLM.from_tensors(PLTConfig.from_file(path),
                                            dequantized_tensors(weights, 32, bits))
    with torch.no_grad():
        for b, (seq, prompt) in enumerate(zip(sequences, prompts)):
            expected = reference(torch.tensor([seq]))[0, len(prompt) - 1:len(prompt) + 8].numpy()
            assert np.abs(np.stack([h[b] for h in history]) - expected).max() <= TOL
    _, fp32_logits = MLXBackend(path).prefill(prompts, 16)
    assert np.abs(history[0] - fp32_logits).max() > 10 * TOL  # the weights really changed


def test_export_bfloat16_runs_close_to_fp32(model_dir, tmp_path):
    import mlx.core as mx

    from exporters.mlx_export import export
    from runtimes.mlx_backend import MLXBackend

    path = model_dir("v1")
    out = export(path, tmp_path / "bf16", dtype="bfloat16")
    assert mx.load(os.path.join(out, "model.safetensors"))["model.norm.weight"].dtype == mx.bfloat16
    backend = MLXBackend(out)
    prompt = random_prompts(7, [9])
    _, logits = backend.prefill(prompt, 16)
    _, fp32_logits = MLXBackend(path).prefill(prompt, 16)
    assert logits.dtype == np.float32 and 0 < np.abs(logits - fp32_logits).max() < 0.1
    state, _ = backend.prefill(prompt, 16)
    backend.step(state, np.array([5]))
    assert backend.cache_bytes(state) == backend.expected_cache_bytes(1, state.capacity, 2)


def test_export_cli_and_bad_options(model_dir, tmp_path, capsys):
    from exporters.mlx_export import ExportError, export
    from plt_port.cli import main

    path = model_dir("plt")
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


def test_failed_export_leaves_target_untouched(model_dir, tmp_path):
    from plt_port.checkpoint import CheckpointError
    from exporters.mlx_export import export

    path = model_dir("plt")
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
def test_backend_errors(model_dir):
    from runtimes import load_backend
    from runtimes.base import BackendError

    import mlx.core as mx

    path = model_dir("plt")
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


def test_backend_imports_and_runs_without_torch(model_dir):
    path = model_dir("plt")
    code = (
        "import sys\n"
        "from runtimes.mlx_backend import MLXBackend\n"
        "import numpy as np\n"
        f"b = MLXBackend({path!r}, loops=3)\n"
        "state, logits = b.prefill([[1, 2, 3]], 8)\n"
        "b.step(state, logits.argmax(-1))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_generate_api_runs_mlx(model_dir, tokenizer_dir):
    generate = pytest.importorskip("runtimes.generate")
    from plt_port.tokenizer import Tokenizer
    from runtimes.mlx_backend import MLXBackend

    path = model_dir("plt")
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
def test_metal_kernel_matches_composed_ops(model_dir):
    from runtimes.mlx_backend import MLXBackend

    path = model_dir("plt", plt_num_loops=3)
    prompts = random_prompts(8, [21, 13])
    _, on, _ = greedy_decode(MLXBackend(path, kernel="on"), prompts, 16)
    _, off, _ = greedy_decode(MLXBackend(path, kernel="off"), prompts, 16)
    assert np.abs(np.stack(on) - np.stack(off)).max() <= TOL


def test_agreement_report(model_dir):
    from runtimes.precision import agreement

    results = agreement(model_dir("plt"), random_prompts(10, [6])[0], steps=6,
                        variants=("fp16", "q4"), group_size=32)
    assert set(results) == {"fp16", "q4"}
    for row in results.values():
        assert 0 <= row["identical_greedy"] <= 1 and row["mean_kl"] >= 0
        assert 0 <= row["free_run_identical_prefix"] <= 6
    assert results["fp16"]["mean_kl"] < results["q4"]["mean_kl"]
