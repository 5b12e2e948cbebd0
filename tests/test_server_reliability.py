"""Reliability of the server and the engine's text path (issue 26): one request must not stall
or bloat the server (stop strings matched in linear time and bounded, bounded request bodies
and lists), a clean shutdown with streams in flight, the small HTTP items (HEAD /health,
Transfer-Encoding with Content-Length), and a bounded fuzz of the HTTP layer.
"""

from __future__ import annotations

import itertools
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
    """A server on a free 127.0.0.1 port in this process (the embedded model)."""

    def __init__(self, **options):
        from plt_port.app.commands.serve import open_server, start_in_thread
        from plt_port.family import default_model_dir

        self.engine, app = open_server(default_model_dir(), "torch", **options)
        self.server, self.thread, self.url = start_in_thread(app)

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
