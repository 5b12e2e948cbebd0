"""The tokenizer's own eos ends generation when config.json names none (and there is no
generation_config.json): sampled and checked to stop in `generate`, in the engine and in the
server. Forced two ways: a logit_bias of +100 on eos (the first token is eos), and a fake
model whose argmax is eos after two other tokens (eos mid-answer, next to a sequence that
goes on).
"""

from __future__ import annotations

import os
import queue

import numpy as np
import pytest

from conftest import CachelessBackend, requires, write_fast_tokenizer
from plt_port.tokenizer import Tokenizer
from runtimes.backends import load_backend
from runtimes.engine import BatchEngine, Request, TokenEvent
from runtimes.generate import generate, stream_generate
from runtimes.sampling import SamplingParams

PROMPT = "def f(x):\n    return "
EOS_FIRST = 100.0  # logit_bias that makes eos the argmax


class EosAfterTwoBackend(CachelessBackend):
    """Next token from the last one: 5 -> 6 -> eos (the tokenizer's, id 2); 7 -> 7 forever;
    anything else -> 5."""

    def logits_for(self, last_tokens) -> np.ndarray:
        nxt = {5: 6, 6: 2, 7: 7}
        logits = np.zeros((len(last_tokens), self.config.vocab_size), np.float32)
        for row, token in enumerate(last_tokens):
            logits[row, nxt.get(int(token), 5)] = 1.0
        return logits


@pytest.fixture(params=["sentencepiece", "tokenizer.json"])
def no_eos_model(request, make_model):
    """A model whose config.json has eos_token_id null: only the tokenizer knows eos."""
    model_dir = make_model("plt", eos_token_id=None)
    if request.param == "tokenizer.json":
        for name in ("tokenizer.model", "tokenizer_config.json"):
            os.remove(os.path.join(model_dir, name))
        write_fast_tokenizer(model_dir, vocab_size=400)
    assert not os.path.exists(os.path.join(model_dir, "generation_config.json"))
    return model_dir


def eos_of(model_dir) -> tuple[Tokenizer, int]:
    tokenizer = Tokenizer.from_dir(model_dir)
    assert len(tokenizer.eos_ids) == 1, tokenizer.eos_ids
    return tokenizer, tokenizer.eos_ids[0]


def test_generate_stops_at_the_tokenizers_eos(no_eos_model):
    tokenizer, eos = eos_of(no_eos_model)
    backend = load_backend("torch", no_eos_model, loops=2)
    assert backend.eos_token_ids == []  # neither config.json nor generation_config.json
    _, last = generate(backend, tokenizer, PROMPT, max_new_tokens=6)
    assert last.generation_tokens == 6 and last.finish_reason == "length"
    responses = list(stream_generate(backend, tokenizer, PROMPT, max_new_tokens=6,
                                     sampling=SamplingParams(temperature=0,
                                                             logit_bias={eos: EOS_FIRST})))
    assert [(r.token, r.finish_reason, r.text) for r in responses] == [(eos, "stop", "")]


def test_generate_stops_at_a_sampled_eos(no_eos_model):
    """At temperature 1 with a seed: the bias makes eos all but certain, sampled not argmax'd."""
    tokenizer, eos = eos_of(no_eos_model)
    backend = load_backend("torch", no_eos_model, loops=2)
    text, last = generate(backend, tokenizer, PROMPT, max_new_tokens=6,
                          sampling=SamplingParams(temperature=1.0, seed=3,
                                                  logit_bias={eos: EOS_FIRST}))
    assert (text, last.token, last.generation_tokens, last.finish_reason) == ("", eos, 1, "stop")


def run_engine(engine: BatchEngine, requests: list[Request], events: list[queue.Queue]
               ) -> list[list[TokenEvent]]:
    for request in requests:
        engine.submit(request)
    out = []
    for q in events:
        got = [q.get(timeout=30)]
        while isinstance(got[-1], TokenEvent) and got[-1].finish_reason is None:
            got.append(q.get(timeout=30))
        assert all(isinstance(e, TokenEvent) for e in got), got[-1]
        out.append(got)
    return out


def test_the_engine_stops_at_the_tokenizers_eos(no_eos_model):
    """A biased request and an unbiased one in one batch: the first ends at eos after one
    token, the second runs to its limit."""
    tokenizer, eos = eos_of(no_eos_model)
    engine = BatchEngine(lambda loops: load_backend("torch", no_eos_model, loops=loops),
                         tokenizer, max_batch=2).start()
    try:
        ids = tokenizer.encode(PROMPT, add_bos=tokenizer.add_bos_token)
        events = [queue.Queue(), queue.Queue()]
        biased = Request(ids, 6, events[0].put,
                         SamplingParams(temperature=0, logit_bias={eos: EOS_FIRST}))
        plain = Request(ids, 6, events[1].put,
                        SamplingParams(temperature=0, logit_bias={eos: -EOS_FIRST}))
        ended, ran = run_engine(engine, [biased, plain], events)
    finally:
        engine.close()
    assert [(e.token, e.finish_reason, e.text) for e in ended] == [(eos, "stop", "")]
    assert len(ran) == 6 and ran[-1].finish_reason == "length" and eos not in [e.token for e in ran]


def test_the_engine_stops_at_an_eos_mid_answer(make_model):
    """The fake's argmax is the tokenizer's eos after two tokens: that sequence ends with two
    tokens of text and finish "stop"; its neighbour (whose argmax is never eos) runs on."""
    model_dir = make_model("plt", eos_token_id=None)
    tokenizer, eos = eos_of(model_dir)
    assert eos == 2
    engine = BatchEngine(lambda loops: EosAfterTwoBackend(model_dir, loops), tokenizer,
                         max_batch=2).start()
    try:
        events = [queue.Queue(), queue.Queue()]
        greedy = SamplingParams(temperature=0)
        ending, going = run_engine(engine, [Request([10, 11], 8, events[0].put, greedy),
                                            Request([10, 7], 8, events[1].put, greedy)], events)
    finally:
        engine.close()
    assert [e.token for e in ending] == [5, 6, eos] and ending[-1].finish_reason == "stop"
    assert "".join(e.text for e in ending) == tokenizer.decode([5, 6])
    assert [e.token for e in going] == [7] * 8 and going[-1].finish_reason == "length"


@requires("fastapi")
@requires("httpx")
def test_the_server_stops_at_the_tokenizers_eos(no_eos_model):
    """/v1/completions and /v1/chat/completions, whole and streamed: eos forced by logit_bias
    is one completion token, finish "stop", no text; without the bias the answer runs to
    max_tokens."""
    import httpx

    from plt_port.app.commands.serve import open_server, start_in_thread

    _, eos = eos_of(no_eos_model)
    engine, app = open_server(no_eos_model, "torch")
    server, thread, url = start_in_thread(app)
    bias = {"logit_bias": {str(eos): EOS_FIRST}, "temperature": 0, "max_tokens": 5}
    try:
        with httpx.Client(base_url=f"{url}/v1", timeout=60) as client:
            done = client.post("/completions", json={"prompt": PROMPT, **bias}).json()
            assert done["choices"][0]["finish_reason"] == "stop", done
            assert done["choices"][0]["text"] == "" and done["usage"]["completion_tokens"] == 1
            chat = client.post("/chat/completions", json={
                "messages": [{"role": "user", "content": PROMPT}], **bias}).json()
            assert chat["choices"][0]["finish_reason"] == "stop", chat
            assert chat["choices"][0]["message"]["content"] == ""
            assert chat["usage"]["completion_tokens"] == 1
            stream = client.post("/completions", json={
                "prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True},
                **bias}).text
            assert '"finish_reason": "stop"' in stream and '"completion_tokens": 1' in stream
            plain = client.post("/completions", json={
                "prompt": PROMPT, "temperature": 0, "max_tokens": 5,
                "logit_bias": {str(eos): -EOS_FIRST}}).json()
            assert plain["choices"][0]["finish_reason"] == "length"
            assert plain["usage"]["completion_tokens"] == 5
    finally:
        server.should_exit = True
        thread.join(15)
        engine.close()
