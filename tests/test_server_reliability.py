"""Reliability of the server and the engine's text path (issue 26): one request must not stall
or bloat the server (stop strings matched in linear time and bounded, bounded request bodies
and lists), a clean shutdown with streams in flight, the small HTTP items (HEAD /health,
Transfer-Encoding with Content-Length), and a bounded fuzz of the HTTP layer.
"""

from __future__ import annotations

import itertools
import json
import sys

import pytest

from runtimes.sequence import StopMatcher


# ---- stop strings ----------------------------------------------------------------------------
def first_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """The reference: the text cut before the stop string that ends first in it (the longest
    of those ending there), found with str.find on the whole text."""
    ends = [(i + len(s), -len(s)) for s in stop if (i := text.find(s)) >= 0]
    if not ends:
        return text, False
    end, minus_length = min(ends)
    return text[:end + minus_length], True


def streamed(matcher: StopMatcher, pieces) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.add(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def splits(text: str):
    """Every way of cutting `text` into non-empty pieces."""
    for cuts in itertools.product((False, True), repeat=len(text) - 1):
        pieces, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                pieces.append(text[start:i])
                start = i
        yield pieces + [text[start:]]


@pytest.mark.parametrize("text,stop", [
    ("aabababacx", ["abab", "bac", "aab"]),
    ("xxabcdyy", ["abcd", "bc"]),              # a shorter one ends first
    ("ENDEND tail", ["END", "xyz"]),
    ("abcabdabcabcabe", ["abcabe", "cabd"]),   # KMP's fallbacks
    ("no stop in here", ["zz", "q"]),
    ("aaaaaaaab", ["aaab", "aaaa"]),
])
def test_stop_matcher_gives_the_same_answer_at_every_split(text, stop):
    expected = first_stop(text, stop)
    for pieces in splits(text):
        assert streamed(StopMatcher(stop), pieces) == expected, pieces


def test_stop_matcher_holds_back_exactly_the_text_that_may_start_a_stop_string():
    matcher = StopMatcher(["abcabd"])
    assert matcher.add("xxabcab") == ("xx", False)
    assert matcher.pending == "abcab"
    assert matcher.add("c") == ("abc", False)  # "abcabc": only "abc" may still start it
    assert matcher.add("abd!") == ("", True)


def count_lines(fn, budget: int) -> int:
    """Lines of Python `fn()` runs in runtimes/sequence.py, failing past `budget` (the work
    done, counted rather than timed)."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        if not frame.f_code.co_filename.endswith("sequence.py"):
            return None
        if event == "line":
            count += 1
            if count > budget:
                raise AssertionError(f"over {budget} lines")
        return trace

    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def test_a_one_mib_stop_string_costs_work_linear_in_the_text():
    stop = "q" * (1 << 20)
    matcher = StopMatcher([stop, "never"])  # its table: one pass over the stop string
    tokens = ["q" * 3] * 200 + ["x"]
    per_char = 40  # lines per character and stop string, with room to spare

    def feed():
        assert streamed(matcher, tokens) == ("q" * 600 + "x", False)

    count_lines(feed, per_char * 2 * sum(map(len, tokens)))


# ---- the server ------------------------------------------------------------------------------
class Running:
    """A server on a free 127.0.0.1 port in this process (default: the embedded model)."""

    def __init__(self, model_dir: str | None = None, backend: str = "torch", **options):
        from plt_port.app.commands.serve import open_server, start_in_thread
        from plt_port.family import default_model_dir

        self.engine, self.app = open_server(model_dir or default_model_dir(), backend, **options)
        self.server, self.thread, self.url = start_in_thread(self.app)

    def post(self, path: str, body, **kwargs):
        import httpx

        return httpx.post(f"{self.url}{path}", json=body, timeout=60, **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.engine.close()


@pytest.fixture(scope="module")
def server():
    running = Running()
    yield running
    running.stop()


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_stop_strings_are_bounded_in_number_and_length_at_the_boundary(server):
    from plt_port.app.service import MAX_STOP_CHARS, MAX_STOP_STRINGS

    def completion(stop):
        return server.post("/v1/completions", {"prompt": "def f", "max_tokens": 2,
                                               "stop": stop})

    assert completion(["s"] * MAX_STOP_STRINGS).status_code == 200
    assert error_of(completion(["s"] * (MAX_STOP_STRINGS + 1)))["param"] == "stop"
    longest = ["q" * (MAX_STOP_CHARS - 1), "z"]
    assert completion(longest).status_code == 200
    error = error_of(completion(longest + ["y"]))
    assert error["param"] == "stop" and str(MAX_STOP_CHARS) in error["message"]
    anthropic = server.post("/v1/messages", {
        "model": "plt", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
        "stop_sequences": ["q" * (MAX_STOP_CHARS + 1)]})
    assert anthropic.status_code == 400 and "stop_sequences" in anthropic.text


def test_anthropic_names_the_stop_sequence_that_ended_first(server):
    """Two stop strings in one token, the shorter a prefix of the longer: it ends first."""
    greedy = {"max_tokens": 24, "temperature": 0}
    choice = server.post("/v1/completions", greedy | {"prompt": "def g", "logprobs": 0}).json()
    full, logprobs = choice["choices"][0]["text"], choice["choices"][0]["logprobs"]
    token, offset = next((t, o) for t, o in zip(logprobs["tokens"], logprobs["text_offset"])
                         if len(t) >= 3 and full.find(t[:2]) == o)
    stops = [token, token[:2]]
    model = server.app.state.service.model_name
    answer = server.post("/v1/messages", greedy | {  # the same prompt: no chat template
        "model": model, "messages": [{"role": "user", "content": "def g"}],
        "stop_sequences": stops}).json()
    assert "".join(block["text"] for block in answer["content"]) == full[:offset]
    assert (answer["stop_reason"], answer["stop_sequence"]) == ("stop_sequence", token[:2])


# ---- request bodies --------------------------------------------------------------------------
LIMIT = 4096


@pytest.fixture(scope="module")
def small_server():
    from plt_port.app.server_options import ServerOptions

    running = Running(server_options=ServerOptions(max_request_bytes=LIMIT))
    yield running
    running.stop()


def raw_exchange(url: str, request: bytes) -> tuple[bytes, bool]:
    """(the response's bytes, whether the server then closed the connection)."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(65536)
        sock.settimeout(1)  # uvicorn closes an idle connection after 5 s
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        return head + b"\r\n\r\n" + body, closed


def padded_body(size: int) -> bytes:
    """A completion request of exactly `size` bytes."""
    import json

    body = {"prompt": "", "max_tokens": 1}
    body["prompt"] = "x" * (size - len(json.dumps(body)))
    data = json.dumps(body).encode()
    assert len(data) == size
    return data


def test_the_body_limit_is_413_json_past_it_and_closes_the_connection(small_server):
    import json

    exact = small_server.post("/v1/completions", None, content=padded_body(LIMIT),
                              headers={"content-type": "application/json"})
    assert exact.status_code != 413, exact.text
    over = padded_body(LIMIT + 1)
    response, closed = raw_exchange(small_server.url, b"POST /v1/completions HTTP/1.1\r\n"
                                    b"Host: x\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: %d\r\n\r\n" % len(over) + over)
    assert response.startswith(b"HTTP/1.1 413") and closed
    error = json.loads(response.partition(b"\r\n\r\n")[2])["error"]
    assert "--max-request-bytes" in error["message"] and str(LIMIT) in error["message"]

    def chunks():  # no Content-Length: the limit counts what arrives
        yield over[:LIMIT // 2]
        yield over[LIMIT // 2:]

    chunked = small_server.post("/v1/messages", None, content=chunks())
    assert chunked.status_code == 413 and chunked.json()["type"] == "error"


def test_the_default_body_limit_fits_the_context_and_is_at_least_1_mib(server):
    from plt_port.app.server_options import ServerOptions

    assert ServerOptions().request_bytes_limit(128 * 1024) == 4 << 20  # 32 bytes a token
    assert ServerOptions().request_bytes_limit(2048) == 1 << 20
    assert ServerOptions(max_request_bytes=10).request_bytes_limit(128 * 1024) == 10
    assert server.app.state.service.max_request_bytes == 1 << 20  # the embedded model's


def test_transfer_encoding_with_content_length_is_answered_then_closed(server):
    body = b'{"prompt": "def f", "max_tokens": 1}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    response, closed = raw_exchange(server.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n" % len(chunked)
                                    + chunked)
    # uvicorn's httptools parser (installed with the serve extra) refuses the framing itself
    # in plain text; under h11 the server's own JSON error names it: a 400 and a close either way
    assert response.startswith(b"HTTP/1.1 400") and closed
    assert b"Transfer-Encoding" in response or b"Invalid HTTP request" in response
    response, closed = raw_exchange(server.url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200") and not closed  # keep-alive otherwise


def test_head_health_is_200(server):
    import httpx

    response = httpx.head(f"{server.url}/health", timeout=30)
    assert response.status_code == 200 and response.content == b""


def test_a_prompt_list_of_a_million_items_is_one_error_in_bounded_memory():
    import tracemalloc

    from pydantic import ValidationError

    from plt_port.app.openai_api import CompletionBody

    body = {"prompt": ["a"] + [7] * 1_000_000}  # neither a list of strings nor of ids
    tracemalloc.start()
    try:
        with pytest.raises(ValidationError) as caught:
            CompletionBody.model_validate(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(caught.value.errors()) == 1 and peak < 5_000_000


def test_long_lists_in_a_request_get_one_400_naming_the_field(server):
    from plt_port.app.service import MAX_MESSAGES

    context = server.engine.backend.config.max_position_embeddings
    ids = server.post("/v1/completions", {"prompt": [1] * (context + 1), "max_tokens": 1})
    assert error_of(ids)["param"] == "prompt" and "context" in error_of(ids)["message"]
    assert server.post("/v1/completions", {"prompt": [1] * context,
                                           "max_tokens": 1}).status_code == 200
    mixed = server.post("/v1/completions", {"prompt": [1] * 100_000 + ["a"], "max_tokens": 1})
    assert error_of(mixed)["param"] == "prompt"
    turn = {"role": "user", "content": "hi"}
    many = server.post("/v1/chat/completions", {"messages": [turn] * (MAX_MESSAGES + 1)})
    assert error_of(many)["param"] == "messages"
    at_bound = server.post("/v1/chat/completions", {"messages": [turn] * MAX_MESSAGES})
    assert at_bound.json()["error"]["param"] != "messages"  # the context refuses it
    blocks = server.post("/v1/messages", {"model": "x", "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "nope"}] * 60_000}]})
    assert blocks.status_code == 400 and blocks.json()["type"] == "error"


# ---- shutdown --------------------------------------------------------------------------------
def read_stream(port: int, path: str, body: dict, started, seen: list) -> None:
    """Read one stream to its end: `seen` gets its lines, or the exception that cut it;
    `started` is set at its first line."""
    import httpx

    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}{path}", json=body,
                          timeout=60) as response:
            for line in response.iter_lines():
                seen.append(line)
                started.set()
    except Exception as exc:  # noqa: BLE001 (a cut stream: httpx.RemoteProtocolError)
        seen.append(exc)
    started.set()


def serve_process(*args):
    import os
    import subprocess

    import httpx

    from plt_port.app.commands.serve import free_port

    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "-m", "plt_port.app.cli", "serve", "--port",
                                str(port), "--threads", "1", *args], cwd=root,
                               stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"PYTHONPATH": root})
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process, port
        except httpx.TransportError:
            assert process.poll() is None, process.stderr.read()
            __import__("time").sleep(0.1)
    raise AssertionError("the server did not start")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_ends_every_stream_cleanly_closes_the_engine_and_exits_0(sig):
    import signal
    import threading

    import httpx

    process, port = serve_process("--max-batch", "4")
    try:
        model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        greedy = {"max_tokens": 2000, "temperature": 0, "stream": True}  # no eos before 2000
        streams = [("/v1/completions", greedy | {"prompt": f"def f{i}"}) for i in range(3)]
        streams.append(("/v1/messages", greedy | {
            "model": model, "messages": [{"role": "user", "content": "def g"}]}))
        started, seen = [threading.Event() for _ in streams], [[] for _ in streams]
        threads = [threading.Thread(target=read_stream, args=(port, path, body, event, out))
                   for (path, body), event, out in zip(streams, started, seen)]
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(timeout=60)  # every stream has sent something
        process.send_signal(getattr(signal, sig))
        for thread in threads:
            thread.join(30)
        assert process.wait(timeout=30) == 0
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for lines in seen[:3]:
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1:] == ["data: [DONE]"], lines[-4:]
        errors = [line for line in lines if line.startswith('data: {"error"')]
        assert len(errors) == 1 and "shutting down" in errors[0]
    assert "event: error" in seen[3] and "shutting down" in "".join(seen[3][-3:]), seen[3][-6:]
    assert "Traceback" not in stderr and "plt-port serve: stopped" in stderr


# ---- small items -----------------------------------------------------------------------------
def test_sampling_errors_name_their_field(server):
    for field, value in [("temperature", -1), ("top_p", 0), ("min_p", 2),
                         ("presence_penalty", 3)]:
        error = error_of(server.post("/v1/completions", {"prompt": "def f", "max_tokens": 1,
                                                         field: value}))
        assert error["param"] == field, error


def test_a_model_directory_deleted_under_an_onnx_server_gives_a_500_without_its_path(
        tmp_path):
    import shutil

    from plt_port.family import default_model_dir
    from runtimes.backends import backend_unavailable_reason

    if backend_unavailable_reason("onnx"):
        pytest.skip(backend_unavailable_reason("onnx"))
    model_dir = tmp_path / "served-model"
    shutil.copytree(default_model_dir(), model_dir)
    running = Running(str(model_dir), "onnx")
    try:
        model = running.app.state.service.model_name
        shutil.rmtree(model_dir)
        response = running.post("/v1/completions", {"model": f"{model}@loops=3",
                                                    "prompt": "def f", "max_tokens": 1})
        assert response.status_code == 500 and str(tmp_path) not in response.text
        assert response.json()["error"]["type"] == "server_error"
    finally:
        running.stop()


# ---- the HTTP fuzzer -------------------------------------------------------------------------
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/messages",
         "/v1/messages/count_tokens", "/v1/models", "/v1/models/plt-stdlib-L2@loops=2",
         "/health", "/metrics", "/nowhere"]
BASES = {  # a valid body of each route, which the fuzzer then bends
    "/v1/completions": {"prompt": "def f", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/messages": {"model": "plt-stdlib-L2", "max_tokens": 2,
                     "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": "plt-stdlib-L2",
                                  "messages": [{"role": "user", "content": "hi"}]},
}
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "n", "stop",
          "stop_sequences", "stream", "stream_options", "temperature", "top_p", "top_k",
          "min_p", "seed", "logit_bias", "logprobs", "top_logprobs", "echo", "tools",
          "tool_choice", "response_format", "structured_outputs", "guided_regex",
          "guided_choice", "guided_json", "loops", "model", "system", "thinking", "suffix",
          "best_of", "repetition_penalty", "presence_penalty", "chat_template_kwargs",
          "metadata", "user", "content", "role", "x"]


def fuzz_strategies():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | \
        st.floats(allow_nan=False) | st.text(max_size=40)
    keys = st.sampled_from(FIELDS) | st.text(max_size=8)
    json_values = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(keys, inner, max_size=5)), max_leaves=25)
    small = st.integers(-3, 6)  # answer lengths that keep the run short
    overrides = st.dictionaries(st.sampled_from(FIELDS), json_values | small, max_size=4)
    path = st.sampled_from(PATHS)

    def body_for(path, data):
        base = BASES.get(path, {})
        bent = base | data.draw(overrides)
        for field in ("max_tokens", "max_completion_tokens", "n"):
            if isinstance(bent.get(field), int) and bent[field] > 6:
                bent[field] = 6
        return bent

    headers = st.dictionaries(
        st.sampled_from(["content-type", "authorization", "x-api-key", "accept", "x-any",
                         "anthropic-version", "content-encoding"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.strip),
        max_size=3)  # (httpx refuses to send a value with spaces around it)
    raw = st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
    return path, body_for, headers, raw


def check_answer(response) -> None:
    assert response.status_code < 500 and response.status_code >= 200, response.text[:500]
    kind = response.headers.get("content-type", "")
    if response.request.method == "HEAD":
        assert response.content == b""
    elif kind.startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
    elif kind.startswith("application/json"):
        json.loads(response.text)
    else:
        assert response.request.url.path == "/metrics", (kind, response.text[:200])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


def test_fuzzed_requests_get_json_2xx_or_4xx_and_the_server_keeps_answering(server):
    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    path, body_for, headers, raw = fuzz_strategies()
    client = httpx.Client(base_url=server.url, timeout=60)
    before = rss_bytes()

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(path=path, data=st.data(), extra=headers, method=st.sampled_from(
        ["POST", "POST", "POST", "GET", "HEAD", "PUT", "DELETE", "OPTIONS"]),
        use_raw=st.booleans())
    def one_request(path, data, extra, method, use_raw):
        content = data.draw(raw) if use_raw else json.dumps(body_for(path, data)).encode()
        request_headers = {"content-type": "application/json"} | extra
        check_answer(client.request(method, path, content=content, headers=request_headers))

    try:
        one_request()
        assert client.get("/health").status_code == 200
    finally:
        client.close()
    assert rss_bytes() - before < 200 << 20
