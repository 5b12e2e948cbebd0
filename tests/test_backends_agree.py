"""The three backends side by side: same cache policy, same greedy text on the same model."""

import numpy as np
import pytest

from runtimes import available_backends, load_backend

BACKENDS = available_backends()


@pytest.mark.parametrize("limit,steps,expected_capacity", [(20, 14, 20), (2048, 10, 256)])
def test_cache_growth_policy_is_shared(make_model, limit, steps, expected_capacity):
    """Prompt of 5 in 6 allocated slots, then enough steps to grow: every backend grows to the
    same capacity (next multiple of 256, capped at max_position_embeddings) and so reports
    the same cache bytes."""
    model_dir = make_model("plt", max_position_embeddings=limit)
    capacities, sizes = {}, {}
    for name in BACKENDS:
        backend = load_backend(name, model_dir, loops=2)
        state, logits = backend.prefill([[5, 6, 7, 8, 9]], max_tokens=6)
        for _ in range(steps):
            logits = backend.step(state, logits.argmax(-1), mode="clp")
        capacities[name], sizes[name] = state.capacity, backend.cache_bytes(state)
        assert sizes[name] == backend.expected_cache_bytes(1, expected_capacity, 4)
    assert set(capacities.values()) == {expected_capacity}, capacities
    assert len(set(sizes.values())) == 1, sizes


def test_generation_fits_exactly_at_the_position_limit(make_model, tokenizer_dir):
    """P prompt tokens + N new tokens need P + N - 1 positions (the last token is never fed)."""
    from plt_port.tokenizer import Tokenizer
    from runtimes.generate import generate

    model_dir = make_model("plt", max_position_embeddings=20)
    tokenizer = Tokenizer.from_dir(model_dir)
    prompt = list(np.arange(10, 20))
    for name in BACKENDS:
        backend = load_backend(name, model_dir, loops=2)
        _, stats = generate(backend, tokenizer, prompt, max_new_tokens=11)
        assert stats.generation_tokens <= 11
        with pytest.raises(Exception, match="max_position_embeddings"):
            generate(backend, tokenizer, prompt, max_new_tokens=12)


def test_option_errors_are_clear_on_every_backend(make_model):
    from runtimes import BackendError

    model_dir = make_model("plt")
    for name in BACKENDS:
        with pytest.raises(BackendError, match=rf"{name} backend: unknown options \['colour'\]"):
            load_backend(name, model_dir, colour="blue")
    for name in set(BACKENDS) & {"torch", "onnx"}:
        for bad in (0, -2, 1.5, True):
            with pytest.raises(BackendError, match="threads must be an integer >= 1"):
                load_backend(name, model_dir, threads=bad)


def test_prompt_errors_are_clear_on_every_backend(make_model):
    from runtimes import BackendError

    model_dir = make_model("plt")
    for name in BACKENDS:
        backend = load_backend(name, model_dir)
        for prompts, max_tokens, message in [([[1, 2.7]], 8, "must be integers"),
                                             ([[1, 2]], 8.0, "max_tokens must be a positive"),
                                             ([[1, 2]], 0, "max_tokens must be a positive"),
                                             ([], 8, "no prompts"), ([[1], []], 8, "prompt 1 is empty"),
                                             ([[1] * 9], 8, "more than the 8 positions"),
                                             ([[1, 10_000]], 8, "outside the vocabulary")]:
            with pytest.raises(BackendError, match=message):
                backend.prefill(prompts, max_tokens)
