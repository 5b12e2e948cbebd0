"""Shared sampler and generate loop: against explicit formulas and the reference model."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CachelessBackend, reference_greedy
from plt_port.tokenizer import Tokenizer
from runtimes.backends import load_backend
from runtimes.generate import GenerateError, StopMatcher, generate, stream_generate
from runtimes.sampling import (Sampler, SamplingError, SamplingParams, apply_min_p,
                               apply_openai_penalties, apply_repetition_penalty, apply_top_k,
                               apply_top_p, softmax)


# ---- sampler ---------------------------------------------------------------------------
PROBS = np.array([[0.5, 0.3, 0.15, 0.05]])
LOGITS = np.log(PROBS)


def kept(logits):
    return np.flatnonzero(np.isfinite(logits[0])).tolist()


def test_filters_keep_the_expected_tokens():
    assert kept(apply_top_k(LOGITS, 2)) == [0, 1]
    assert kept(apply_top_k(LOGITS, 0)) == [0, 1, 2, 3]
    assert kept(apply_top_p(LOGITS, 0.5)) == [0]
    assert kept(apply_top_p(LOGITS, 0.7)) == [0, 1]
    assert kept(apply_top_p(LOGITS, 0.81)) == [0, 1, 2]
    assert kept(apply_top_p(LOGITS[:, ::-1], 0.7)) == [2, 3]  # order-independent
    assert kept(apply_min_p(LOGITS, 0.35)) == [0, 1]     # p >= 0.175
    assert kept(apply_min_p(LOGITS, 0.1)) == [0, 1, 2, 3]
    np.testing.assert_allclose(softmax(LOGITS), PROBS)


def test_repetition_penalty_formula():
    logits = np.array([[2.0, -1.0, 0.5, 3.0]], dtype=np.float32)
    out = apply_repetition_penalty(logits, [[0, 1, 1]], penalty=2.0, context_size=20)
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, [[0, 1, 3]], penalty=2.0, context_size=1)
    np.testing.assert_allclose(out, [[2.0, -1.0, 0.5, 1.5]])  # only the last token counts
    assert Sampler(SamplingParams(repetition_penalty=4.0))(logits, [[3]])[0] == 0


def test_openai_penalties_count_generated_tokens_and_bias_adds():
    """presence: once per token generated; frequency: per use; the prompt (the first call's
    history) never counts; logit_bias adds before the greedy pick."""
    logits = np.array([[2.0, 1.9, 0.0, 1.0]], dtype=np.float32)
    sampler = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert sampler(logits, [[0, 0, 0]])[0] == 0          # prompt tokens: no penalty
    assert sampler(logits, [[0, 0, 0, 0]])[0] == 1       # 2.0 - 0.75 < 1.9
    assert sampler(logits, [[0, 0, 0, 0, 1]])[0] == 0    # 1.25 > 1.9 - 0.75
    np.testing.assert_allclose(apply_openai_penalties(logits, [[9, 0, 0, 3]], [1], 0.5, 0.25),
                               [[2.0 - 1.0, 1.9, 0.0, 1.0 - 0.75]])
    assert Sampler(SamplingParams(logit_bias={2: 2.5}))(logits)[0] == 2
    with pytest.raises(SamplingError, match="vocabulary"):
        Sampler(SamplingParams(logit_bias={4: 1}))(logits)


def empirical(params, logits, draws=20000):
    tokens = Sampler(params)(np.repeat(logits, draws, axis=0))
    return np.bincount(tokens, minlength=logits.shape[-1]) / draws


def test_sampling_frequencies_follow_the_filtered_distribution():
    # temperature 2: p ~ sqrt(p), renormalised
    expected = np.sqrt(PROBS[0]) / np.sqrt(PROBS[0]).sum()
    np.testing.assert_allclose(empirical(SamplingParams(temperature=2.0, seed=0), LOGITS),
                               expected, atol=0.015)
    # top-k runs before top-p: renormalised top-2 gives token 0 a mass of 0.625 >= 0.6, so
    # only token 0 is left (top-p alone would have kept token 1 too)
    freq = empirical(SamplingParams(temperature=1.0, top_k=2, top_p=0.6, seed=1), LOGITS)
    np.testing.assert_allclose(freq, [1, 0, 0, 0])
    freq = empirical(SamplingParams(temperature=1.0, top_k=3, top_p=0.7, seed=1), LOGITS)
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    freq = empirical(SamplingParams(temperature=1.0, min_p=0.25, seed=2), LOGITS)
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.015)


def test_seed_reproducible_and_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal((1, 50)).repeat(200, axis=0)
    a = Sampler(SamplingParams(temperature=1.0, seed=3))(logits)
    b = Sampler(SamplingParams(temperature=1.0, seed=3))(logits)
    c = Sampler(SamplingParams(temperature=1.0, seed=4))(logits)
    assert (a == b).all() and not (a == c).all()
    assert (Sampler()(logits) == logits.argmax(-1)).all()


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_k", -2), ("top_k", 1.5),
                                         ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0),
                                         ("repetition_penalty", 0.0), ("seed", -1),
                                         ("presence_penalty", 2.5), ("frequency_penalty", -3),
                                         ("logit_bias", {5: 101}), ("logit_bias", {-1: 1})])
def test_bad_sampling_parameters(field, value):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value})


def test_stop_matcher_holds_back_partial_matches():
    matcher = StopMatcher(["END", "xyz"])
    assert matcher.add("abcE") == ("abc", False)
    assert matcher.add("N") == ("", False)
    assert matcher.add("x") == ("EN", False)  # "ENx" cannot start "END"; "x" may start "xyz"
    assert matcher.pending == "x"
    assert matcher.add("yq") == ("xyq", False)
    matcher = StopMatcher(["END"])
    assert matcher.add("abEN") == ("ab", False)
    assert matcher.add("Dtail") == ("", True)


# ---- generate on the torch backend ---------------------------------------------------
PROMPT = "def add(a, b):\n    return"


@pytest.mark.parametrize("fmt,mode", [("plt", "clp"), ("plt", "naive"), ("v1", "clp")])
def test_greedy_stream_matches_reference_and_reports_stats(make_model, fmt, mode):
    model_dir = make_model(fmt, eos_token_id=None)
    tokenizer = Tokenizer.from_dir(model_dir)
    backend = load_backend("torch", model_dir, loops=3)
    responses = list(stream_generate(backend, tokenizer, PROMPT, max_new_tokens=12,
                                     decode_mode=mode, prefill_chunk_size=3))
    prompt_ids = tokenizer.encode(PROMPT, add_bos=True)
    tokens = [r.token for r in responses]
    assert tokens == reference_greedy(model_dir, prompt_ids, 3, 12)
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)
    assert [r.finish_reason for r in responses] == [None] * 11 + ["length"]
    last = responses[-1]
    assert [r.generation_tokens for r in responses] == list(range(1, 13))
    assert last.prompt_tokens == len(prompt_ids)
    assert last.cache_bytes == backend.expected_cache_bytes(1, len(prompt_ids) + 12 - 1, 4)
    assert (last.backend, last.loops) == ("torch", 3)
    assert last.decode_mode == ("naive" if fmt == "v1" else mode)
    assert last.ttft_s > 0 and last.prompt_tps > 0 and last.generation_tps > 0


def test_eos_and_stop_strings(make_model):
    model_dir = make_model("plt", eos_token_id=None)
    tokenizer = Tokenizer.from_dir(model_dir)
    backend = load_backend("torch", model_dir, loops=2)
    full_text, _ = generate(backend, tokenizer, PROMPT, max_new_tokens=24)
    tokens = [r.token for r in stream_generate(backend, tokenizer, PROMPT, max_new_tokens=24)]

    # eos: the 4th greedy token, declared in config.json, ends the answer (and adds no text)
    eos = tokens[3]
    first = tokens.index(eos)
    eos_backend = load_backend("torch", make_model("plt", eos_token_id=[eos]), loops=2)
    text, last = generate(eos_backend, tokenizer, PROMPT, max_new_tokens=24)
    assert (last.finish_reason, last.token, last.generation_tokens) == ("stop", eos, first + 1)
    assert text == tokenizer.decode(tokens[:first])

    # a stop string in the middle of the text: everything before it, and nothing after
    stop = full_text[len(full_text) // 2:len(full_text) // 2 + 3]
    text, last = generate(backend, tokenizer, PROMPT, max_new_tokens=24, stop=[stop, "\x00never"])
    assert last.finish_reason == "stop"
    assert text == full_text[:full_text.index(stop)]


def test_seeded_sampling_reproducible_and_modes_agree(make_model):
    model_dir = make_model("plt", eos_token_id=None)
    tokenizer = Tokenizer.from_dir(model_dir)
    backend = load_backend("torch", model_dir, loops=2)
    params = SamplingParams(temperature=1.5, top_k=40, top_p=0.95, min_p=0.01,
                            repetition_penalty=1.2, seed=11)
    runs = [generate(backend, tokenizer, PROMPT, max_new_tokens=16, sampling=params,
                     decode_mode=mode)[0] for mode in ("clp", "naive", "clp")]
    assert runs[0] == runs[1] == runs[2]
    other = generate(backend, tokenizer, PROMPT, max_new_tokens=16,
                     sampling=SamplingParams(temperature=1.5, seed=12))[0]
    assert other != runs[0]


def test_token_id_prompt_and_errors(make_model):
    model_dir = make_model("plt", eos_token_id=None, max_position_embeddings=40)
    tokenizer = Tokenizer.from_dir(model_dir)
    backend = load_backend("torch", model_dir)
    ids = tokenizer.encode(PROMPT, add_bos=True)
    assert generate(backend, tokenizer, ids, max_new_tokens=5)[0] == \
        generate(backend, tokenizer, PROMPT, max_new_tokens=5)[0]
    with pytest.raises(GenerateError, match="empty"):
        generate(backend, tokenizer, "", max_new_tokens=5)
    with pytest.raises(GenerateError, match="empty"):
        generate(backend, tokenizer, [], max_new_tokens=5)
    with pytest.raises(GenerateError, match="max_new_tokens"):
        generate(backend, tokenizer, PROMPT, max_new_tokens=0)
    with pytest.raises(GenerateError, match="max_position_embeddings=40"):
        generate(backend, tokenizer, PROMPT, max_new_tokens=39)


class ScriptedBackend(CachelessBackend):
    """Emits a fixed token script through one-hot logits: tests the loop, not a model."""

    def __init__(self, model_dir, script):
        super().__init__(model_dir)
        self.script = script

    def new_caches(self, batch, capacity):
        self.emitted = 0  # each generate call starts the script again

    def logits_for(self, last_tokens):
        logits = np.zeros((1, self.config.vocab_size), dtype=np.float32)
        logits[0, self.script[self.emitted]] = 1.0
        self.emitted += 1
        return logits


def test_stream_deltas_are_whole_characters_and_stop_spans_tokens(make_model):
    model_dir = make_model("plt", eos_token_id=None)
    tokenizer = Tokenizer.from_dir(model_dir)
    target = "x = 'é→𝔸'\nreturn END of it"
    script = tokenizer.encode(target)
    assert any(tokenizer.sp.is_byte(t) for t in script)  # multi-byte chars come as byte pieces
    backend = ScriptedBackend(model_dir, script)
    responses = list(stream_generate(backend, tokenizer, "a", max_new_tokens=len(script)))
    assert "".join(r.text for r in responses) == target
    assert all("\ufffd" not in r.text for r in responses)
    text, last = generate(backend, tokenizer, "a", max_new_tokens=len(script), stop=["END"])
    assert (text, last.finish_reason) == ("x = 'é→𝔸'\nreturn ", "stop")
