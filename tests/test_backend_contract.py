"""The backend contract (runtimes/backends/base.py), tested once for every backend against the
reference full forward of plt_port/model.py: prefill and decode, chunking, growth past the
allocated capacity, batches of different lengths, clp == naive, writing and freeing slots of a
running batch, cache bytes and input errors.

A backend whose framework is not installed is skipped (saying so); one whose own module
fails to import fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_error_fits_precision, greedy_run, random_prompts, reference_logits
from plt_port.cache_layout import grown_capacity
from runtimes.backends import BackendError, load_backend

TOL = 1e-4  # fp32 parity between backends and the reference


def assert_matches_reference(model_dir, prompts, sequences, history, loops):
    reference = reference_logits(model_dir, sequences, loops)
    for b, prompt in enumerate(prompts):
        expected = reference[b][len(prompt) - 1:len(prompt) - 1 + len(history)]
        got = np.stack([logits[b] for logits in history])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=0, err_msg=f"sequence {b}")


@pytest.mark.parametrize("fmt", ["plt", "v1"])
@pytest.mark.parametrize("loops", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["clp", "naive"])
def test_prefill_and_decode_match_reference(backend_name, make_model, fmt, loops, mode):
    """A batch of 3 prompts of different lengths (two longer than the window of 8), prefilled
    in chunks of 5, then 6 greedy steps: every logit row equals the full forward."""
    model_dir = make_model(fmt)
    backend = load_backend(backend_name, model_dir, loops=loops)
    prompts = random_prompts([19, 4, 11], seed=loops)
    sequences, history, state = greedy_run(backend, prompts, 6, mode, chunk_size=5)
    assert_matches_reference(model_dir, prompts, sequences, history, loops)
    assert state.lengths.tolist() == [len(s) for s in sequences]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
def test_chunked_prefill(backend_name, make_model, chunk_size):
    model_dir = make_model("plt")
    backend = load_backend(backend_name, model_dir, loops=3)
    prompts = random_prompts([17, 9], seed=3)
    sequences, history, _ = greedy_run(backend, prompts, 2, chunk_size=chunk_size)
    assert_matches_reference(model_dir, prompts, sequences, history, 3)


@pytest.mark.parametrize("variant", [
    dict(plt_gate_use_hidden_states=False, tie_word_embeddings=True),
    dict(plt_normalize_per_loop=False, plt_emb_scale=0.5, plt_hidden_scale=1.5),
], ids=["query-gate-tied", "no-norm-scaled"])
def test_config_variants_match_reference(backend_name, make_model, variant):
    model_dir = make_model("plt", **variant)
    backend = load_backend(backend_name, model_dir, loops=3)
    prompts = random_prompts([12, 7], seed=5)
    for mode in ("clp", "naive"):
        sequences, history, _ = greedy_run(backend, prompts, 4, mode, chunk_size=5)
        assert_matches_reference(model_dir, prompts, sequences, history, 3)


def test_growth_across_a_capacity_boundary(backend_name, make_model):
    """A prompt that fills its 256 allocated slots exactly, then steps: the global cache grows
    to the next multiple of 256 and decoding stays exact."""
    model_dir = make_model("plt")
    backend = load_backend(backend_name, model_dir, loops=2)
    prompts = random_prompts([256], seed=6)
    sequences, history, state = greedy_run(backend, prompts, 3, max_tokens=256)
    assert state.capacity == 512
    assert_matches_reference(model_dir, prompts, sequences, history, 2)
    assert backend.cache_bytes(state) == backend.expected_cache_bytes(1, 512, 4)


def test_growth_policy_rounds_up_to_the_next_multiple_of_256():
    assert [grown_capacity(n, 2048) for n in (1, 255, 256, 257, 512, 513)] == \
        [256, 256, 256, 512, 512, 768]
    assert grown_capacity(300, 400) == 400


def test_growth_to_an_exact_multiple_allocates_no_more(backend_name, make_model):
    backend = load_backend(backend_name, make_model("plt"), loops=2)
    _, _, state = greedy_run(backend, random_prompts([255], seed=4), 1, max_tokens=255)
    assert state.capacity == 256
    assert backend.cache_bytes(state) == backend.expected_cache_bytes(1, 256, 4)


@pytest.mark.parametrize("limit,expected_capacity", [(20, 20), (2048, 256)])
def test_growth_policy_is_capped_at_the_position_limit(backend_name, make_model, limit,
                                                      expected_capacity):
    backend = load_backend(backend_name, make_model("plt", max_position_embeddings=limit), loops=2)
    _, _, state = greedy_run(backend, [[5, 6, 7, 8, 9]], 14, max_tokens=6)
    assert state.capacity == expected_capacity


@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_batch_equals_one_by_one(backend_name, make_model, fmt):
    backend = load_backend(backend_name, make_model(fmt), loops=3)
    prompts = random_prompts([3, 14, 9], seed=7)
    state, batch_logits = backend.prefill(prompts, max_tokens=24, chunk_size=4)
    singles = [backend.prefill([p], max_tokens=24) for p in prompts]
    rng = np.random.default_rng(1)
    for _ in range(6):
        for b, (_, single_logits) in enumerate(singles):
            np.testing.assert_allclose(batch_logits[b], single_logits[0], atol=1e-5, rtol=0)
        tokens = rng.integers(3, 512, len(prompts))
        batch_logits = backend.step(state, tokens)
        singles = [(s, backend.step(s, tokens[b:b + 1])) for b, (s, _) in enumerate(singles)]


def test_clp_and_naive_give_the_same_tokens(backend_name, make_model):
    backend = load_backend(backend_name, make_model("plt", seed=1), loops=3)
    prompt = random_prompts([6], seed=2)
    clp_tokens, clp_logits, _ = greedy_run(backend, prompt, 32, "clp")
    naive_tokens, naive_logits, _ = greedy_run(backend, prompt, 32, "naive")
    assert clp_tokens == naive_tokens
    np.testing.assert_allclose(np.stack(clp_logits), np.stack(naive_logits), atol=TOL, rtol=0)
    assert len(set(clp_tokens[0][6:])) > 4  # a model repeating one token would prove little


@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_write_and_free_slots_of_a_running_batch(backend_name, make_model, fmt):
    """A running batch takes a freshly prefilled sequence into a slot (also one longer than the
    batch's capacity) and lets another go; every running sequence decodes as it would alone."""
    model_dir = make_model(fmt)
    backend = load_backend(backend_name, model_dir, loops=3)
    first, second, newcomer = random_prompts([5, 9, 30], seed=8)
    running, logits = backend.prefill([first, second], max_tokens=12)
    for _ in range(3):
        tokens = logits.argmax(-1)
        first.append(int(tokens[0]))
        second.append(int(tokens[1]))
        logits = backend.step(running, tokens)
    fresh, fresh_logits = backend.prefill([newcomer], max_tokens=len(newcomer))
    backend.write_slot(running, 1, fresh)
    backend.free_slot(running, 0)
    assert running.lengths.tolist() == [0, 30] and running.active.tolist() == [False, True]
    assert running.capacity >= 30
    history = [fresh_logits[0]]
    tokens = np.array([0, fresh_logits[0].argmax()])
    for _ in range(4):
        newcomer.append(int(tokens[1]))
        logits = backend.step(running, tokens)
        history.append(logits[1])
        tokens = np.array([0, logits[1].argmax()])
    assert running.lengths.tolist() == [0, 34]
    expected = reference_logits(model_dir, [newcomer], 3)[0][29:34]
    np.testing.assert_allclose(np.stack(history), expected, atol=TOL, rtol=0)
    backend.write_slot(running, 0, backend.prefill([first], max_tokens=len(first))[0])
    logits = backend.step(running, np.array([7, 7]))
    expected = reference_logits(model_dir, [first + [7], newcomer + [7]], 3)
    np.testing.assert_allclose(logits[0], expected[0][-1], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits[1], expected[1][-1], atol=TOL, rtol=0)


def test_empty_state_takes_sequences_and_at_loops_shares_the_weights(backend_name, make_model):
    """A batch of free slots (the width a server re-lays a running batch out into) decodes what
    is written into it; `at_loops` serves another loop count from the same loaded weights
    (ONNX, whose graphs bake the loop count in, says so)."""
    model_dir = make_model("plt")
    backend = load_backend(backend_name, model_dir, loops=2)
    empty = backend.empty_state(4, 16)
    assert empty.lengths.tolist() == [0] * 4 and not empty.active.any()
    assert backend.cache_bytes(empty) == backend.expected_cache_bytes(4, 16, 4)
    if not backend.loops_share_weights:
        with pytest.raises(BackendError, match="load it again"):
            backend.at_loops(3)
        return
    at_three = backend.at_loops(3)
    assert at_three.loops == 3 and backend.loops == 2
    assert at_three.__dict__.get("model") is backend.__dict__.get("model")
    prompt = random_prompts([9], seed=4)[0]
    state = at_three.empty_state(4, 16)
    at_three.write_slot(state, 2, at_three.prefill([prompt], max_tokens=9)[0])
    logits = at_three.step(state, np.array([0, 0, 7, 0]))
    assert state.lengths.tolist() == [0, 0, 10, 0]
    expected = reference_logits(model_dir, [prompt + [7]], 3)[0][-1]
    np.testing.assert_allclose(logits[2], expected, atol=TOL, rtol=0)
    with pytest.raises(BackendError, match="batch must be a positive integer"):
        backend.empty_state(0, 16)


@pytest.mark.parametrize("fmt,loops", [("plt", 1), ("plt", 3), ("v1", 2), ("v1", 4)])
def test_cache_bytes_follow_the_spec(backend_name, make_model, fmt, loops):
    overrides = dict(plt_window_size=[4, 0]) if fmt == "plt" else dict(loop_window_size=6)
    backend = load_backend(backend_name, make_model(fmt, **overrides), loops=loops)
    cfg = backend.config
    state, _ = backend.prefill(random_prompts([7, 3]), max_tokens=20)
    window = 5 if fmt == "plt" else 6
    # per layer: (20 global + (L-1) * window ring slots) x (K, V) x batch 2 x KV heads x D x 4 B
    per_layer = (20 + (loops - 1) * window) * 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    carry = (loops - 1) * 2 * cfg.hidden_size * 4 if fmt == "plt" else 0  # [L-1, B, d], PLT only
    assert backend.cache_bytes(state) == cfg.num_hidden_layers * per_layer + carry


def test_mode_run_says_what_runs(backend_name, make_model):
    assert load_backend(backend_name, make_model("v1"), loops=2).mode_run("clp") == "naive"
    assert load_backend(backend_name, make_model("plt"), loops=1).mode_run("clp") == "naive"
    assert load_backend(backend_name, make_model("plt"), loops=2).mode_run("clp") == "clp"


def test_bad_requests_raise_one_clear_error(backend_name, make_model):
    backend = load_backend(backend_name, make_model("plt", max_position_embeddings=32), loops=2)
    for prompts, max_tokens, message in [([[1, 2.7]], 8, "must be integers"),
                                         ([[1, 2]], 8.0, "max_tokens must be a positive"),
                                         ([[1, 2]], 0, "max_tokens must be a positive"),
                                         ([], 8, "no prompts"), ([[1], []], 8, "prompt 1 is empty"),
                                         ([[1] * 9], 8, "more than the 8 positions"),
                                         ([[1, 10_000]], 8, "outside the vocabulary"),
                                         ([[1]], 33, "max_position_embeddings=32")]:
        with pytest.raises(BackendError, match=message):
            backend.prefill(prompts, max_tokens)
    with pytest.raises(BackendError, match="chunk size"):
        backend.prefill([[4]], max_tokens=8, chunk_size=0)
    state, _ = backend.prefill([[4, 5]], max_tokens=8)
    with pytest.raises(BackendError, match="decode mode"):
        backend.step(state, np.array([3]), mode="fast")
    with pytest.raises(BackendError, match="one integer token per sequence"):
        backend.step(state, np.array([3, 4]))
    with pytest.raises(BackendError, match="outside the vocabulary"):
        backend.step(state, np.array([-1]))
    for slot, source_slot in [(1, 0), (0, 1), (-1, 0)]:  # a batch of one: slot 0 only
        with pytest.raises(BackendError, match="out of range"):
            backend.write_slot(state, slot, state, source_slot)
    with pytest.raises(BackendError, match="out of range"):
        backend.free_slot(state, 1)
    state, _ = backend.prefill([[4] * 31], max_tokens=31)
    backend.step(state, np.array([3]))  # position 31: the last one the model supports
    with pytest.raises(BackendError, match="max_position_embeddings=32"):
        backend.step(state, np.array([3]))


LOW_PRECISIONS = {"torch": ("bfloat16", "float16"), "onnx": ("float16",),
                  "mlx": ("bfloat16", "float16")}


def test_low_precision_runs_in_the_dtype_asked(backend_name, make_model):
    """Each low precision a backend offers runs in that dtype (weights, caches: cache bytes at
    2 bytes an element) with an error that fits the dtype; logits stay fp32."""
    model_dir = make_model("plt")
    prompts = random_prompts([12, 5], seed=9)
    for dtype in LOW_PRECISIONS[backend_name]:
        backend = load_backend(backend_name, model_dir, loops=2, dtype=dtype)
        assert backend.run_dtype == dtype
        sequences, history, state = greedy_run(backend, prompts, 8)
        assert history[-1].dtype == np.float32
        assert backend.cache_bytes(state) == backend.expected_cache_bytes(2, state.capacity, 2)
        reference = reference_logits(model_dir, sequences, 2)
        for b, prompt in enumerate(prompts):
            expected = reference[b][len(prompt) - 1:len(prompt) + 8]
            assert_error_fits_precision(np.stack([h[b] for h in history]), expected, dtype)


# ---- rings of min(window, capacity) slots ---------------------------------------------------
WIDE = dict(plt_window_size=[39, 0])  # a 40-key window, wider than the short prompts below


@pytest.mark.parametrize("prompt_len,max_tokens", [(12, 20), (40, 40), (45, 60)],
                         ids=["window>capacity", "window=capacity", "window<capacity"])
def test_rings_are_no_longer_than_the_capacity_and_grow_with_it(backend_name, make_model,
                                                                prompt_len, max_tokens):
    """A ring holds min(window, capacity) slots: a prompt shorter than the window gets a ring
    of its capacity, which grows with the global cache (here past the window while decoding)
    and the logits stay those of the full forward; the bytes follow the SPEC formula."""
    model_dir = make_model("plt", **WIDE)
    backend = load_backend(backend_name, model_dir, loops=3)
    prompts = random_prompts([prompt_len, 7], seed=11)
    state, _ = backend.prefill(prompts, max_tokens, chunk_size=16)
    assert backend.cache_bytes(state) == backend.expected_cache_bytes(2, max_tokens, 4)
    steps = max(0, max_tokens - prompt_len) + 30  # past the capacity and past the window
    sequences, history, state = greedy_run(backend, prompts, steps, max_tokens=max_tokens,
                                           chunk_size=16)
    assert state.capacity == 256 and len(sequences[0]) > 40
    assert backend.cache_bytes(state) == backend.expected_cache_bytes(2, 256, 4)
    assert_matches_reference(model_dir, prompts, sequences, history, 3)


def test_write_slot_moves_sequences_between_rings_of_other_sizes(backend_name, make_model):
    """A running batch whose rings are shorter than the window takes a sequence with longer
    rings (and grows), then one with shorter rings: each decodes as the full forward says."""
    model_dir = make_model("plt", **WIDE)
    backend = load_backend(backend_name, model_dir, loops=3)
    short, long_, tiny = random_prompts([6, 33, 4], seed=12)
    running, _ = backend.prefill([short, short], max_tokens=10)          # rings of 10 slots
    backend.write_slot(running, 0, backend.prefill([long_], max_tokens=33)[0])   # 33 -> 40
    backend.write_slot(running, 1, backend.prefill([tiny], max_tokens=4)[0])     # 4 -> 40
    sequences, history = [long_, tiny], []
    tokens = np.array([5, 6])
    for _ in range(10):
        for sequence, token in zip(sequences, tokens):
            sequence.append(int(token))
        history.append(backend.step(running, tokens))
        tokens = history[-1].argmax(-1)
    expected = reference_logits(model_dir, sequences, 3)
    for b, start in enumerate((33, 4)):
        np.testing.assert_allclose(np.stack([h[b] for h in history]), expected[b][start:start + 10],
                                   atol=TOL, rtol=0)
