"""The chat endpoint's default max_tokens (a request that sets none) against the context:
the answer's limit is min(the server's default, context - prompt + 1), since P prompt tokens
and N new ones take P + N - 1 positions (the last new token is never fed back). At the exact
edge (a prompt of the whole context) the answer is one token; one prompt token more is a 400
naming the context. Checked by the tokens the server really generates (eos suppressed, so a
greedy answer runs to its limit).
"""

from __future__ import annotations

import pytest

from conftest import requires

pytestmark = [requires("fastapi"), requires("httpx")]

CONTEXT = 64
SMALL_DEFAULT = 7


def text_of(tokenizer, tokens: int) -> str:
    """A text the chat endpoint (no chat template: the content is the prompt) encodes to
    exactly `tokens` ids."""
    for k in range(tokens + 1):
        for tail in ("", "x", "(", "x("):
            text = " ".join(str(i % 10) for i in range(k)) + tail
            if text and len(tokenizer.encode(text, add_bos=tokenizer.add_bos_token)) == tokens:
                return text
    raise AssertionError(f"no text of {tokens} tokens")


class Server:
    def __init__(self, model_dir, default_max_tokens=None):
        import httpx

        from plt_port.app.commands.serve import open_server, start_in_thread
        from plt_port.app.server_options import ServerOptions

        options = ServerOptions() if default_max_tokens is None \
            else ServerOptions(default_max_tokens=default_max_tokens)
        self.engine, app = open_server(model_dir, "torch", server_options=options)
        self.tokenizer = self.engine.tokenizer
        self.server, self.thread, url = start_in_thread(app)
        self.client = httpx.Client(base_url=f"{url}/v1", timeout=60)

    def chat(self, prompt_tokens: int, **fields):
        eos = self.tokenizer.eos_ids[0]
        body = {"messages": [{"role": "user", "content": text_of(self.tokenizer, prompt_tokens)}],
                "temperature": 0, "logit_bias": {str(eos): -100}, **fields}
        return self.client.post("/chat/completions", json=body)

    def close(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(15)
        self.engine.close()


@pytest.fixture(scope="module")
def small_context_model(tmp_path_factory, tokenizer_dir):
    from conftest import LOUD_STD, tiny_config
    from plt_port.random_model import save_random_model

    return save_random_model(tmp_path_factory.mktemp("ctx") / "model",
                             tiny_config("plt", max_position_embeddings=CONTEXT), 0,
                             tokenizer_dir=tokenizer_dir, std=LOUD_STD)


def answer_tokens(response, prompt_tokens: int) -> tuple[int, str]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    return body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]


@pytest.mark.parametrize("prompt_tokens", [20, CONTEXT - 1, CONTEXT])
def test_the_default_fills_the_context_left(small_context_model, prompt_tokens):
    """The server's default (4096) is far over the context: the answer takes every position
    left, context - P + 1 tokens, ending at "length"; at P = context, one token."""
    server = Server(small_context_model)
    try:
        got = answer_tokens(server.chat(prompt_tokens), prompt_tokens)
        streamed = server.client.post("/chat/completions", json={
            "messages": [{"role": "user", "content": text_of(server.tokenizer, prompt_tokens)}],
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "logit_bias": {str(server.tokenizer.eos_ids[0]): -100}}).text
    finally:
        server.close()
    assert got == (CONTEXT - prompt_tokens + 1, "length")
    assert f'"completion_tokens": {CONTEXT - prompt_tokens + 1}' in streamed


def test_a_prompt_one_past_the_context_is_a_400(small_context_model):
    server = Server(small_context_model)
    try:
        response = server.chat(CONTEXT + 1)
        explicit = server.chat(CONTEXT - 3, max_tokens=5)  # 61 + 5 - 1 = 65 positions
        fits = server.chat(CONTEXT - 3, max_tokens=4)      # 64: exactly the context
    finally:
        server.close()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and f"={CONTEXT}" in error["message"]
    assert explicit.status_code == 400 and \
        explicit.json()["error"]["code"] == "context_length_exceeded"
    assert answer_tokens(fits, CONTEXT - 3) == (4, "length")


def test_a_smaller_default_is_the_limit_until_the_context_is_smaller(small_context_model):
    """--max-tokens 7: 7 tokens while 7 positions are left (P = context - 6, the edge where
    both bounds are equal, included), then the context's."""
    server = Server(small_context_model, default_max_tokens=SMALL_DEFAULT)
    try:
        got = {p: answer_tokens(server.chat(p), p)
               for p in (10, CONTEXT - SMALL_DEFAULT + 1, CONTEXT - SMALL_DEFAULT + 2)}
    finally:
        server.close()
    assert got == {10: (7, "length"), CONTEXT - 6: (7, "length"), CONTEXT - 5: (6, "length")}
