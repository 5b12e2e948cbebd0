"""The 8192-window regime of IQuest-Coder-V1-40B-Loop-Thinking (v1, `loop_window_size: 8192`)
on a model of its shape but tiny width: a prompt that crosses the window, prefilled in chunks
across the boundary, then decode steps, on every backend against the reference full forward
at fp32; and rings that stay as short as the sequence below the window.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import LOUD_STD, greedy_run, random_prompts, reference_logits, tiny_config
from plt_port.random_model import save_random_model
from runtimes.backends import BACKENDS, backend_unavailable_reason, load_backend

TOL = 1e-4
THINKING = dict(loop_window_size=8192, hidden_size=16, num_hidden_layers=1,
                num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                intermediate_size=24, max_position_embeddings=8448)
PROMPT, CHUNK, STEPS = 8230, 3000, 3  # the chunk 6000..8999 crosses position 8192


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    """(model dir, prompt, reference logits of prompt + greedy tokens) computed once."""
    model_dir = save_random_model(tmp_path_factory.mktemp("thinking"),
                                  tiny_config("v1", **THINKING), seed=0, std=LOUD_STD)
    return model_dir, random_prompts([PROMPT], seed=1)


@pytest.fixture(scope="module")
def reference(thinking_model):
    cache = {}

    def logits_of(sequence):
        key = tuple(sequence)
        if key not in cache:
            cache[key] = reference_logits(thinking_model[0], [sequence], 2)[0]
        return cache[key]

    return logits_of


@pytest.mark.parametrize("name", list(BACKENDS))
def test_window_8192_crossed_in_a_chunked_prefill_matches_the_reference(thinking_model,
                                                                       reference, name):
    if backend_unavailable_reason(name):
        pytest.skip(backend_unavailable_reason(name))
    model_dir, prompts = thinking_model
    backend = load_backend(name, model_dir, loops=2)
    assert backend.config.window == 8192
    sequences, history, state = greedy_run(backend, prompts, STEPS, chunk_size=CHUNK)
    expected = reference(sequences[0])[PROMPT - 1:PROMPT + STEPS]
    np.testing.assert_allclose(np.stack([h[0] for h in history]), expected, atol=TOL, rtol=0)
    assert backend.cache_bytes(state) == backend.expected_cache_bytes(1, state.capacity, 4)


def test_a_short_sequence_holds_a_short_ring(thinking_model):
    """Before this, every sequence of a window-8192 model held an 8192-slot ring."""
    backend = load_backend("torch", thinking_model[0], loops=2)
    state, _ = backend.prefill([[5, 6, 7, 8, 9]], max_tokens=9)
    cfg = backend.config
    global_and_ring = 2 * cfg.num_key_value_heads * cfg.head_dim * 4 * (9 + 9)
    assert backend.cache_bytes(state) == global_and_ring * cfg.num_hidden_layers
