"""The three backends side by side: `make test` installs all three, and on the same model and
prompt they generate the same greedy text and report the same cache elements."""

import numpy as np
import pytest

from plt_port import checkpoint, family
from plt_port.memory import usable_cores
from plt_port.tokenizer import Tokenizer
from runtimes.backends import BACKENDS, BackendError, backend_unavailable_reason, load_backend
from runtimes.generate import GenerateError, generate


def test_every_backend_is_installed():
    """A backend that silently went missing would turn every cross-backend test into a
    comparison of fewer backends."""
    assert {name: backend_unavailable_reason(name) for name in BACKENDS} == \
        {name: None for name in BACKENDS}


@pytest.mark.parametrize("loops", [1, 2, 3])
def test_same_greedy_text_and_cache_bytes_on_the_embedded_model(loops):
    model_dir = family.default_model_dir()
    tokenizer = Tokenizer.from_dir(model_dir)
    runs = {}
    for name in BACKENDS:  # each in its default precision for this fp16 checkpoint
        backend = load_backend(name, model_dir, loops=loops)
        text, stats = generate(backend, tokenizer, "def binary_search(items, target):\n    ",
                               max_new_tokens=24)
        itemsize = np.dtype(checkpoint.numpy_dtype(backend.run_dtype)).itemsize
        runs[name] = (text, stats.generation_tokens, stats.cache_bytes // itemsize)
    assert len(set(runs.values())) == 1, runs
    assert runs["torch"][1] == 24 and len(runs["torch"][0]) > 24


def test_generation_fits_exactly_at_the_position_limit(make_model):
    """P prompt tokens + N new tokens need P + N - 1 positions (the last token is never fed)."""
    model_dir = make_model("plt", max_position_embeddings=20, eos_token_id=None)
    tokenizer = Tokenizer.from_dir(model_dir)
    prompt = list(range(10, 20))
    for name in BACKENDS:
        backend = load_backend(name, model_dir, loops=2)
        _, stats = generate(backend, tokenizer, prompt, max_new_tokens=11)
        assert (stats.generation_tokens, stats.finish_reason) == (11, "length")
        with pytest.raises(GenerateError, match="max_position_embeddings"):
            generate(backend, tokenizer, prompt, max_new_tokens=12)


def test_option_errors_are_clear_on_every_backend(make_model):
    model_dir = make_model("plt")
    for name in BACKENDS:
        with pytest.raises(BackendError, match=rf"{name} backend: unknown options \['colour'\]"):
            load_backend(name, model_dir, colour="blue")
    for name in ("torch", "onnx"):
        for bad in (0, -2, 1.5, True, usable_cores() + 1):
            with pytest.raises(BackendError, match="threads must be an integer from 1 to"):
                load_backend(name, model_dir, threads=bad)


def test_greedy_tokens_are_the_same_on_a_random_model(make_model):
    """Token by token on a loud random model (not text, which could hide a shifted token)."""
    model_dir = make_model("plt", seed=4)
    prompt = np.random.default_rng(0).integers(3, 512, 9).tolist()
    runs = {}
    for name in BACKENDS:
        backend = load_backend(name, model_dir, loops=3)
        state, logits = backend.prefill([prompt], 48)
        tokens = []
        for _ in range(32):
            tokens.append(int(logits[0].argmax()))
            logits = backend.step(state, np.array(tokens[-1:]))
        runs[name] = tokens
    assert runs["torch"] == runs["onnx"] == runs["mlx"]
    assert len(set(runs["torch"])) > 4
