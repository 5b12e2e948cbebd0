"""The Gradio demo: handlers (fake and real backends), the loop analysis fallback, the CLI,
a real-browser run of a two-column comparison, and a concurrent-client load test."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time

import numpy as np
import pytest

from conftest import CachelessBackend, requires
from plt_port.errors import PLTError


pytest.importorskip("gradio")
generate_api = pytest.importorskip("runtimes.generate", reason="needs the shared generate API "
                                   "(runtimes/generate.py)")

from demo import columns as engine  # noqa: E402
from demo.app import (COLUMN_SETTINGS, build_app, column_settings, compare_handler,  # noqa: E402
                      launch)
from demo.columns import DemoInputError, EnginePool, Limits  # noqa: E402
from demo.loop_analysis import loop_analysis, loss_series  # noqa: E402

# gr.Warning outside a served page (the handlers called directly) is a UserWarning
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
ALL_AVAILABLE = {"torch": None, "mlx": None, "onnx": None}


# ---- a fake backend whose greedy continuation is known in advance --------------------------------
class ChainBackend(CachelessBackend):
    """Logits that put all mass on chain[(index of last token) + loops]: the continuation of
    any prompt is known without running a model. Logs each step's (loop count, batch width);
    a step takes `step_s`."""

    name = "chain"
    step_s = 0.0

    def __init__(self, model_dir, loops=None, chain=(), step_log=None, **options):
        super().__init__(model_dir, loops)
        self.options = options
        self.chain = list(chain)
        self.step_log = step_log if step_log is not None else []

    def next_token(self, token: int) -> int:
        index = self.chain.index(token) if token in self.chain else 0
        return self.chain[(index + self.loops) % len(self.chain)]

    def logits_for(self, last_tokens) -> np.ndarray:
        logits = np.zeros((len(last_tokens), self.config.vocab_size), np.float32)
        for b, token in enumerate(last_tokens):
            logits[b, self.next_token(int(token))] = 30.0
        return logits

    def decode_rows(self, caches, tokens, positions, mode):
        self.step_log.append((self.loops, len(tokens)))
        time.sleep(self.step_s)
        return self.logits_for(tokens)

    def cache_nbytes(self, caches):
        return 0


def plain_tokens(tokenizer) -> list[int]:
    """Ids that decode to whole characters on their own (no control or byte-fallback pieces)."""
    sp = tokenizer.sp
    return [i for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
            and i not in tokenizer.eos_ids and tokenizer.token_bytes(i).strip()]


def expected_chain_text(tokenizer, chain, prompt_ids, loops, n):
    ids, token = [], prompt_ids[-1]
    for _ in range(n):
        index = chain.index(token) if token in chain else 0
        token = chain[(index + loops) % len(chain)]
        ids.append(token)
    return tokenizer.decode(ids)


def settings(*columns) -> dict:
    """(model, backend, loops, mode[, speculative]) tuples as the page passes them:
    model_1=..., loops_1=... (speculative_N left out when a tuple has none, as an older API
    caller would)."""
    return {f"{name}_{i + 1}": str(value) for i, column in enumerate(columns)
            for name, value in zip(COLUMN_SETTINGS, column)}


def run_compare(handler, prompt, n_columns, columns, max_new_tokens=12, **sampling):
    args = dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0,
                use_chat_template=True) | sampling
    outputs = None
    for outputs in handler(prompt, n_columns, max_new_tokens, args["temperature"], args["top_p"],
                           args["top_k"], args["repetition_penalty"], args["seed"],
                           args["use_chat_template"], **settings(*columns)):
        pass
    return [(outputs[2 * i], outputs[2 * i + 1]) for i in range(len(outputs) // 2)]


@pytest.fixture
def chain_setup(make_model):
    from plt_port.tokenizer import Tokenizer

    model_dir = make_model("plt", seed=1)
    tokenizer = Tokenizer.from_dir(model_dir)
    chain = plain_tokens(tokenizer)[:40]
    step_log: list[int] = []

    def loader(name, model_dir, loops=None, **options):
        return ChainBackend(model_dir, loops, chain=chain, step_log=step_log, **options)

    pool = EnginePool({"tiny": model_dir}, loader, {"onnx": {"threads": 1}})
    yield pool, tokenizer, chain, step_log
    pool.close()


# ---- handler unit tests --------------------------------------------------------------------------
def test_columns_stream_known_continuations(chain_setup):
    pool, tokenizer, chain, step_log = chain_setup
    handler = compare_handler(pool, Limits(), ALL_AVAILABLE)
    prompt = "def fibonacci(n):"
    specs = [("tiny", "torch", 1, "clp"), ("tiny", "onnx", 3, "naive")]
    columns = run_compare(handler, prompt, 2, specs, max_new_tokens=12)
    ids = tokenizer.encode(prompt, add_bos=True)
    for (text, stats), loops in zip(columns[:2], (1, 3)):
        assert text == prompt + expected_chain_text(tokenizer, chain, ids, loops, 12)
        assert "tok/s" in stats and "TTFT" in stats and "finish: **length**" in stats
        assert "cache " in stats and f"{len(ids)} + 12 tokens" in stats
    # the decode label says what ran: one loop has no CLP
    assert "decode naive (one loop has no CLP)" in columns[0][1]
    assert "decode naive ·" in columns[1][1]
    assert columns[2:] == [("", ""), ("", "")]
    assert sorted(step_log) == [(1, 1)] * 11 + [(3, 1)] * 11  # each column's own steps
    engines = {backend: pool._engines[key].backend for key in pool.loaded()
               for backend in [key[1]]}
    assert engines["onnx"].options == {"threads": 1} and engines["torch"].options == {}


def test_columns_on_one_engine_batch_together(chain_setup, monkeypatch):
    """Three columns at one loop count decode as rows of shared steps; a fourth at another
    loop count is another batch of the same engine, on the same loaded weights."""
    pool, tokenizer, chain, step_log = chain_setup
    monkeypatch.setattr(ChainBackend, "step_s", 0.005)
    handler = compare_handler(pool, Limits(), ALL_AVAILABLE)
    columns = run_compare(handler, "x = 1", 4, [("tiny", "torch", 2, "clp")] * 3
                          + [("tiny", "torch", 3, "clp")])
    ids = tokenizer.encode("x = 1", add_bos=True)
    for (text, stats), loops in zip(columns, (2, 2, 2, 3)):
        assert text == "x = 1" + expected_chain_text(tokenizer, chain, ids, loops, 12)
        assert "finish: **length**" in stats
    assert len(pool.loaded()) == 1
    engine_ = pool._engines[pool.loaded()[0]]
    assert set(engine_.backends) == {2, 3}
    assert len({id(b.chain) for b in engine_.backends.values()}) == 1  # one load: at_loops
    two_loop_steps = [width for loops, width in step_log if loops == 2]
    assert max(two_loop_steps) >= 2 and len(two_loop_steps) < 3 * 11, step_log


@requires("torch")
def test_torch_columns_on_one_backend_each_get_their_solo_text(make_model):
    """Seeded sampling: columns batched together (two at two loops, one at three) each give
    the text `generate` gives alone."""
    from plt_port.tokenizer import Tokenizer
    from runtimes.backends import load_backend
    from runtimes.generate import generate
    from runtimes.sampling import SamplingParams

    model_dir = make_model("plt", seed=4, eos_token_id=None)
    tokenizer = Tokenizer.from_dir(model_dir)
    prompt = "def add(a, b):\n"
    pool = EnginePool({"tiny": model_dir})
    try:
        columns = run_compare(compare_handler(pool, Limits(), ALL_AVAILABLE), prompt, 3,
                              [("tiny", "torch", 2, "clp")] * 2 + [("tiny", "torch", 3, "clp")],
                              max_new_tokens=16, temperature=0.9, seed=3)
    finally:
        pool.close()
    sampling = SamplingParams(temperature=0.9, seed=3)
    for (text, stats), loops in zip(columns, (2, 2, 3)):
        alone, _ = generate(load_backend("torch", model_dir, loops=loops), tokenizer, prompt,
                            max_new_tokens=16, sampling=sampling)
        assert text == prompt + alone and "finish: **length**" in stats


@requires("torch")
def test_speculative_columns_give_the_plain_columns_text_and_their_draft_stats(make_model):
    """Greedy: a column with prompt-lookup speculation, and one drafted by a model (here the
    column's own model, at its own loop count: every draft right), each on an engine of its
    own (so it decodes alone and drafts), give exactly the text of the same column without
    it; their stats count the drafts verified and accepted, and the tokens per verify."""
    from plt_port.config import PLTConfig

    model_dir = make_model("plt", seed=4, eos_token_id=None)
    loops = PLTConfig.from_file(model_dir).num_loops
    prompt = "def add(a, b):\n    return a + b\n\n\n" * 3
    pool = EnginePool({"tiny": model_dir})
    try:
        columns = run_compare(compare_handler(pool, Limits(), ALL_AVAILABLE), prompt, 3,
                              [("tiny", "torch", loops, "clp", speculative)
                               for speculative in ("off", "ngram", "draft tiny")],
                              max_new_tokens=24, use_chat_template=False)
        loaded = sorted(key[1:] for key in pool.loaded())
    finally:
        pool.close()
    (plain, plain_stats), (ngram, ngram_stats), (drafted, draft_stats) = columns[:3]
    assert plain.startswith(prompt) and len(plain) > len(prompt)
    assert ngram == plain and drafted == plain, (plain, ngram, drafted)
    assert "drafts" not in plain_stats
    for label, stats in (("ngram", ngram_stats), ("draft tiny", draft_stats)):
        assert "finish: **length**" in stats
        assert re.search(rf"{label}: \d+/\d+ drafts accepted \(\d+%\), [\d.]+ tokens/verify",
                         stats), stats
    assert re.search(r"draft tiny: (\d+)/\1 drafts accepted \(100%\)", draft_stats)
    assert loaded == [("torch", "draft tiny"), ("torch", "ngram"), ("torch", "off")]


@pytest.mark.parametrize("prompt, limits, field, message", [
    ("", Limits(), None, "prompt is empty"),
    ("   \n", Limits(), None, "prompt is empty"),
    ("x" * 200, Limits(max_prompt_tokens=10), None, "200 characters"),
    ("def f():", Limits(max_new_tokens=8), ("max_new_tokens", 9), "max new tokens"),
    ("def f():", Limits(), ("temperature", -1), "temperature"),
    ("def f():", Limits(), ("top_k", 2.5), "top-k"),
    ("def f():", Limits(), ("repetition_penalty", 0.5), "repetition penalty"),
])
def test_bad_input_gives_a_message_not_an_exception(chain_setup, prompt, limits, field, message):
    pool = chain_setup[0]
    handler = compare_handler(pool, limits, ALL_AVAILABLE)
    kwargs = {field[0]: field[1]} if field else {}
    columns = run_compare(handler, prompt, 2, [("tiny", "torch", 1, "clp")] * 2, **kwargs)
    assert all(message in stats and stats.startswith("⚠️") for _, stats in columns)
    with pytest.raises(DemoInputError, match=message):
        engine.make_request(prompt, limits, **({"max_new_tokens": 4, "temperature": 0, "top_p": 1,
                                                 "top_k": 0, "seed": 0} | kwargs))


def test_unknown_model_loops_and_mode_are_refused(chain_setup):
    handler = compare_handler(chain_setup[0], Limits(), ALL_AVAILABLE)
    for column, message in [(("other", "torch", 1, "clp"), "unknown model 'other'"),
                            (("tiny", "torch", 9, "clp"), "loops must be"),
                            (("tiny", "torch", 2, "fast"), "decode mode must be"),
                            (("tiny", "torch", 2, "clp", "draft other"),
                             "speculative must be one of off, ngram, draft tiny, got 'draft "
                             "other'"),
                            # the fake backend gives no logits per row: no verify
                            (("tiny", "torch", 2, "clp", "ngram"),
                             "could not load the backend: the chain backend cannot verify")]:
        columns = run_compare(handler, "def f():", 1, [column])
        assert message in columns[0][1]


def test_prompt_over_the_token_cap_and_unavailable_backend(chain_setup):
    pool, tokenizer, chain, _ = chain_setup
    reasons = dict(ALL_AVAILABLE, mlx="backend 'mlx' is not available (no libmlx); install it "
                                      "with: pip install 'plt-port[mlx]'")
    prompt = "def f(a, b, c):\n    return a + b + c\n"
    n_tokens = len(tokenizer.encode(prompt, add_bos=True))
    handler = compare_handler(pool, Limits(max_prompt_tokens=n_tokens - 1), reasons)
    columns = run_compare(handler, prompt, 2, [("tiny", "torch", 1, "clp"),
                                               ("tiny", "mlx", 1, "clp")])
    assert f"{n_tokens} tokens long" in columns[0][1] and "at most" in columns[0][1]
    assert "pip install 'plt-port[mlx]'" in columns[1][1]
    handler = compare_handler(pool, Limits(max_prompt_tokens=n_tokens), reasons)
    columns = run_compare(handler, prompt, 2, [("tiny", "torch", 1, "clp"),
                                               ("tiny", "mlx", 1, "clp")])
    assert "finish: **length**" in columns[0][1]


def test_failed_load_is_shown_then_retried(chain_setup):
    _, _, chain, _ = chain_setup
    model_dir = chain_setup[0].models["tiny"]
    attempts = []

    def flaky_loader(name, model_dir, loops=None):
        attempts.append(name)
        if len(attempts) == 1:
            raise PLTError("export failed: disk full")
        if len(attempts) == 2:
            raise RuntimeError("boom")
        return ChainBackend(model_dir, loops, chain=chain)

    pool = EnginePool({"tiny": model_dir}, flaky_loader)
    handler = compare_handler(pool, Limits(), ALL_AVAILABLE)
    columns = [run_compare(handler, "def f():", 1, [("tiny", "onnx", 1, "clp")])[0][1]
               for _ in range(3)]
    pool.close()
    assert "could not load the backend: export failed: disk full" in columns[0]
    assert "internal error (RuntimeError: boom)" in columns[1] and "Traceback" not in columns[1]
    assert "finish: **length**" in columns[2]


def test_chat_template_wraps_the_prompt(make_model, tokenizer_dir, tmp_path):
    import json

    model_dir = make_model("plt")
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["chat_template"] = "USER: {{ messages[0]['content'] }}\nASSISTANT:"
    with open(config_path, "w") as f:
        json.dump(config, f)
    from plt_port.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    request = engine.make_request("def f():", Limits(), max_new_tokens=4, temperature=0, top_p=1,
                                  top_k=0, seed=0)
    ids, shown = engine.encode_prompt(tokenizer, request)
    assert ids == [tokenizer.bos_id] + tokenizer.encode("USER: def f():\nASSISTANT:")
    assert shown == ""
    plain = engine.make_request("def f():", Limits(), max_new_tokens=4, temperature=0, top_p=1,
                                top_k=0, seed=0, use_chat_template=False)
    assert engine.encode_prompt(tokenizer, plain) == (tokenizer.encode("def f():", add_bos=True),
                                                      "def f():")
    tokenizer.add_bos_token = False  # as the embedded family's tokenizer_config says
    assert engine.encode_prompt(tokenizer, plain)[0] == tokenizer.encode("def f():")
    assert engine.encode_prompt(tokenizer, request)[0] == tokenizer.encode(
        "USER: def f():\nASSISTANT:")


def test_queue_caps_concurrency_and_waiting_requests(make_model):
    app = build_app([make_model("plt")], Limits(concurrency=3, queue_size=5),
                    backends={"torch": None})
    assert (app._queue.default_concurrency_limit, app._queue.max_size) == (3, 5)
    with pytest.raises(PLTError, match="no model directories"):
        build_app([], Limits(), backends={"torch": None})


def test_stop_says_stopped_in_every_column_still_running():
    running = "**12 tok/s** · TTFT 3 ms · cache 1 KiB · 4 + 2 tokens · decode clp · generating…"
    assert engine.stopped_stats(running).endswith("decode clp · ⏹ stopped")
    assert engine.stopped_stats(engine.loading_message(engine.ColumnSpec("m", "onnx", 2, "clp"))) \
        == engine.STOPPED == engine.stopped_stats("⏳ prefilling…")
    finished = running.replace("generating…", "finish: **length**")
    assert engine.stopped_stats(finished) == finished
    assert engine.stopped_stats("⚠️ the prompt is empty") == "⚠️ the prompt is empty"


def test_human_bytes():
    assert engine.human_bytes(512) == "512 B"
    assert engine.human_bytes(3 * 1024 * 1024 // 2) == "1.5 MiB"
    assert engine.human_bytes(5 * 1024**4) == "5120.0 GiB"


# ---- real torch backend against the reference model ----------------------------------------------
@requires("torch")
@pytest.mark.parametrize("loops, mode", [(1, "clp"), (2, "clp"), (3, "naive")])
def test_torch_column_matches_reference_greedy(make_model, loops, mode):
    import torch

    from plt_port.model import PLTForCausalLM
    from plt_port.tokenizer import Tokenizer

    model_dir = make_model("plt", seed=3)
    tokenizer = Tokenizer.from_dir(model_dir)
    prompt, n_new = "def add(a, b):\n", 10
    model = PLTForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer.encode(prompt, add_bos=True)
    eos = set(tokenizer.eos_ids) | set(model.config.eos_token_ids)
    new = []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([ids + new]), loops=loops)[0, -1]
            new.append(int(torch.argmax(logits)))
            if new[-1] in eos:
                break
    pool = EnginePool({"tiny": model_dir})
    try:
        handler = compare_handler(pool, Limits(), ALL_AVAILABLE)
        (text, stats), = run_compare(handler, prompt, 1, [("tiny", "torch", loops, mode)],
                                     max_new_tokens=n_new)[:1]
    finally:
        pool.close()
    assert text == prompt + tokenizer.decode(new)
    finish = "stop" if new[-1] in eos else "length"
    assert f"finish: **{finish}**" in stats and f"decode {'naive' if loops == 1 else mode}" in stats


# ---- loop analysis tab ---------------------------------------------------------------------------
HELDOUT = {"split": "validation", "tokens": 1024, "rows": [
    {"model": "plt-l1", "loops": 1, "loss": 2.90, "perplexity": 18.2, "accuracy": 0.3},
    {"model": "plt-l1", "loops": 2, "loss": 3.40, "perplexity": 30.0, "accuracy": 0.2},
    {"model": "plt-l2", "loops": 1, "loss": 3.10, "perplexity": 22.2, "accuracy": 0.25},
    {"model": "plt-l2", "loops": 2, "loss": 2.50, "perplexity": 12.2, "accuracy": 0.35},
    {"model": "plt-l2", "loops": 3, "loss": 2.55, "perplexity": 12.8, "accuracy": 0.34},
    {"model": "unigram baseline", "loops": "-", "loss": 5.00, "perplexity": 148.4,
     "accuracy": 0.1}]}


def test_heldout_loss_series():
    assert loss_series(HELDOUT) == {"plt-l1": ([1.0, 2.0], [2.90, 3.40]),
                                    "plt-l2": ([1.0, 2.0, 3.0], [3.10, 2.50, 2.55])}


def test_the_packaged_heldout_rows_are_the_cards():
    from plt_port.family import HELDOUT_JSON, MODEL_CARD

    with open(HELDOUT_JSON) as f:
        heldout = json.load(f)
    card = open(MODEL_CARD).read()
    for row in heldout["rows"]:
        if row["model"] == "unigram baseline" or row["loops"] == int(row["model"][-1]):
            assert f"| {row['model']} | {row['loops']} | {row['loss']:.4f} |" in card


def test_loop_analysis_falls_back_to_the_heldout_rows(make_model, monkeypatch):
    import plt_port.diagnostics as diagnostics

    model_dir = make_model("plt")
    with open(os.path.join(model_dir, "heldout.json"), "w") as f:
        json.dump(HELDOUT, f)

    def broken(model_dir, loops=None):
        raise ValueError("no held-out split")

    monkeypatch.setattr(diagnostics, "loop_analysis_figures", broken)
    images, figure, note = loop_analysis(model_dir, 2)
    assert "ValueError: no held-out split" in note and "| plt-l2 | 3 | 2.5500 |" in note
    assert os.path.abspath(model_dir) not in note
    assert images == []
    lines = {line.get_label(): line.get_ydata().tolist() for line in figure.axes[0].lines}
    assert lines == {"plt-l1": [2.90, 3.40], "plt-l2": [3.10, 2.50, 2.55]}


def test_loop_analysis_shows_the_diagnostics_figures(make_model, monkeypatch):
    import plt_port.diagnostics as diagnostics
    from matplotlib.figure import Figure

    calls = []

    def figures(model_dir, loops=None):
        calls.append((model_dir, loops))
        fig = Figure(figsize=(2, 1), dpi=50)
        fig.add_subplot().plot([1, 2], [3, 4])
        return [("step size", fig), ("gate mean", Figure(figsize=(2, 1), dpi=50))]

    monkeypatch.setattr(diagnostics, "loop_analysis_figures", figures)
    model_dir = make_model("plt")
    images, figure, note = loop_analysis(model_dir, 3)
    assert calls == [(model_dir, 3)] and figure is None
    assert [caption for _, caption in images] == ["step size", "gate mean"]
    assert images[0][0].shape == (50, 100, 3)


# ---- the command ---------------------------------------------------------------------------------
def test_demo_command_defaults_and_missing_models(monkeypatch, capsys):
    from plt_port.app import cli
    from plt_port.app.commands import demo as demo_command

    args = cli.build_parser("demo").parse_args(["demo"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, None)
    monkeypatch.setattr(demo_command, "family_dirs", lambda: [])
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "no models to serve" in err and "--model DIR" in err and "Traceback" not in err
    assert cli.main(["demo", "--model", "/nonexistent/model"]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_default_columns_family_and_single_model():
    from demo.app import default_columns

    family = default_columns({"L1": 1, "L2": 2, "L3": 3}, ["torch", "onnx"])
    assert [(c.model, c.loops, c.backend) for c in family] == [
        ("L1", 1, "torch"), ("L2", 2, "torch"), ("L3", 3, "torch"), ("L1", 1, "torch")]
    single = default_columns({"m": 2}, ["onnx"])
    assert [(c.model, c.loops, c.backend) for c in single] == [
        ("m", n, "onnx") for n in range(1, 5)]


@requires("torch")
def test_demo_command_serves_the_page_on_loopback(make_model, tmp_path):
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "plt_port.app.cli", "demo", "--model",
                                   make_model("plt"), "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PLT_PORT_CACHE": str(tmp_path / "cache")})
    try:
        deadline, page = time.monotonic() + 90, None
        while page is None and time.monotonic() < deadline and server.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
            except OSError:
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
    log = log_path.read_text()
    assert page is not None and b"PLT loop comparison" in page, log
    assert f"http://127.0.0.1:{port}" in log and "gradio.live" not in log  # no share link


# ---- a served page -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_demo(make_model):
    """The real page on a free loopback port, torch backend on a tiny model."""
    model_dir = make_model("plt", seed=5)
    app = build_app([model_dir], Limits(max_new_tokens=64, concurrency=2, queue_size=32),
                    backend_options={"torch": {"threads": 1}}, backends={"torch": None})
    _, url, _ = launch(app, host="127.0.0.1", port=free_port(), prevent_thread_lock=True,
                       quiet=True)
    yield url
    app.close()
    app.pool.close()


def run_two_columns(page) -> list[str]:
    """Press Run, wait until both columns finish; their stats."""
    page.locator("#run").click()
    for i in range(2):
        page.wait_for_function(
            f"document.querySelector('#stats-{i}')?.innerText.includes('finish:')",
            timeout=60_000)
    return [page.locator(f"#stats-{i}").inner_text() for i in range(2)]


@requires("torch")
@requires("playwright")
@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM} "
                    "(`make browser-deps` or `apt-get install chromium`)")
def test_browser_two_column_comparison(served_demo, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(served_demo, wait_until="networkidle")
            page.locator("#prompt textarea").fill("def fibonacci(n):\n")
            stats = run_two_columns(page)
            texts = [page.locator(f"#output-{i} .cm-content").inner_text() for i in range(2)]
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        finally:
            browser.close()
    if os.environ.get("PLT_DEMO_SCREENSHOT"):
        shutil.copy(tmp_path / "demo.png", os.environ["PLT_DEMO_SCREENSHOT"])
    for text, stat in zip(texts, stats):
        assert text.startswith("def fibonacci(n):") and len(text) > len("def fibonacci(n):\n")
        assert "tok/s" in stat and "TTFT" in stat and "cache" in stat and "finish:" in stat
    assert "decode naive" in stats[0] and "decode clp" in stats[1]  # 1 loop has no CLP
    assert (tmp_path / "demo.png").stat().st_size > 10_000


class SlowChainBackend(ChainBackend):
    step_s = 0.05  # 96 tokens (the page's default) take about five seconds


@pytest.fixture
def served_slow_demo(make_model):
    """The real page over a slow fake backend: a comparison runs long enough to be stopped."""
    from plt_port.tokenizer import Tokenizer

    model_dir = make_model("plt", seed=6)
    chain = plain_tokens(Tokenizer.from_dir(model_dir))[:40]
    app = build_app([model_dir], Limits(max_new_tokens=96), backends={"torch": None},
                    loader=lambda name, path, loops=None, **_: SlowChainBackend(path, loops,
                                                                                chain=chain))
    _, url, _ = launch(app, host="127.0.0.1", port=free_port(), prevent_thread_lock=True,
                       quiet=True)
    yield url, app.pool
    app.close()
    app.pool.close()


@requires("playwright")
@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM}")
def test_browser_stop_says_stopped_and_frees_the_engine(served_slow_demo):
    from playwright.sync_api import sync_playwright

    url, pool = served_slow_demo
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="networkidle")
            page.locator("#run").click()
            for i in range(2):
                page.wait_for_function(f"document.querySelector('#stats-{i}')?.innerText"
                                       f".includes('generating')", timeout=60_000)
            page.locator("#stop").click()
            for i in range(2):
                page.wait_for_function(f"document.querySelector('#stats-{i}')?.innerText"
                                       f".includes('stopped')", timeout=30_000)
            time.sleep(0.5)  # a late update of the cancelled run must not come back
            stats = [page.locator(f"#stats-{i}").inner_text() for i in range(2)]
        finally:
            browser.close()
    assert all("stopped" in s and "generating" not in s and "finish:" not in s for s in stats)
    engines = [pool._engines[key] for key in pool.loaded()]
    deadline = time.monotonic() + 10
    while any(e.running_count for e in engines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e.running_count for e in engines] == [0]  # the cancelled columns freed their slots


@requires("torch")
def test_api_endpoints_are_named_and_take_the_values_they_advertise(served_demo, capfd, caplog):
    """gradio_client sees real parameter names and calls /compare with exactly the types
    and values it advertises; a refused value is one log line, never a traceback."""
    from gradio_client import Client

    client = Client(served_demo, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    compare_api = api["/compare"]["parameters"]
    names = [p["parameter_name"] for p in compare_api]
    assert names == ["prompt", "columns", "max_new_tokens", "temperature", "top_p", "top_k",
                     "repetition_penalty", "seed", "use_chat_template",
                     *column_settings(engine.MAX_COLUMNS)]
    assert [p["parameter_name"] for p in api["/loop_analysis"]["parameters"]] == ["model", "loops"]
    loops_type = next(p for p in compare_api if p["parameter_name"] == "loops_2")["type"]
    from plt_port.config import MAX_LOOPS

    assert loops_type["enum"] == [str(n) for n in range(1, MAX_LOOPS + 1)]
    values = {p["parameter_name"]: p["parameter_default"] for p in compare_api}
    speculative_type = next(p for p in compare_api
                            if p["parameter_name"] == "speculative_2")["type"]
    assert speculative_type["enum"] == ["off", "ngram", "draft model-plt-0"]
    out = client.predict(**(values | {"prompt": "def add(a, b):\n", "max_new_tokens": 6,
                                      "loops_2": loops_type["enum"][2],
                                      "speculative_2": "ngram"}), api_name="/compare")
    assert out[0].startswith("def add(a, b):\n") and "finish: **length**" in out[1]
    assert "decode clp" in out[3] and "6 tokens" in out[3] and "ngram: " in out[3]
    assert "ngram" not in out[1]
    capfd.readouterr()
    caplog.clear()
    refused = client.predict(**(values | {"loops_1": "9"}), api_name="/compare")
    assert f"loops must be a whole number from 1 to {MAX_LOOPS}" in refused[1]
    assert "Traceback" not in capfd.readouterr().err
    records = [r for r in caplog.records if r.name.startswith("plt_port")]
    assert [(r.levelname, r.exc_info) for r in records] == [("WARNING", None)]
    assert records[0].getMessage().startswith("refused a comparison: loops must be")


@requires("torch")
@pytest.mark.parametrize("endpoint,field,value,label", [
    ("/compare", "columns", "abc", "Columns"), ("/compare", "temperature", [1], "Temperature"),
    ("/compare", "seed", {"a": 1}, "Seed"), ("/loop_analysis", "loops", "abc", "Loops")])
def test_api_values_of_the_wrong_type_are_one_log_line_and_a_message(served_demo, capfd, caplog,
                                                                       endpoint, field, value,
                                                                       label):
    """A value Gradio's own component cannot read (an API call, not the page) is refused like
    the demo's own checks: one warning line, a message, never a traceback or `error: null`."""
    from gradio_client import Client

    client = Client(served_demo, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    values = {p["parameter_name"]: p["parameter_default"] for p in api[endpoint]["parameters"]}
    capfd.readouterr()
    caplog.clear()
    with pytest.raises(Exception, match=f"{label}.*is not a valid value"):
        client.predict(**(values | {field: value}), api_name=endpoint)
    assert "Traceback" not in capfd.readouterr().err
    records = [r for r in caplog.records if r.name.startswith("plt_port")]
    assert [(r.levelname, r.exc_info) for r in records] == [("WARNING", None)]


def chain_family(tmp_path, tokenizer_dir) -> tuple[list[str], list[dict]]:
    """Two tiny random models named like the chains family, and one chain example for them."""
    from conftest import LOUD_STD, tiny_config
    from plt_port import tasks
    from plt_port.random_model import save_random_model

    dirs = [save_random_model(tmp_path / f"plt-chains-L{loops}", tiny_config(plt_num_loops=loops),
                              seed=loops, tokenizer_dir=tokenizer_dir, std=LOUD_STD)
            for loops in (1, 2)]
    program = tasks.programs("validation", "demo-test", 1, [2])[0]
    example = {"prompt": program.prompt, "answer": program.answer, "depth": 2,
               "columns": [["plt-chains-L1", 1], ["plt-chains-L2", 2]],
               "answers": {"plt-chains-L1": "x", "plt-chains-L2": program.answer}}
    return dirs, [example]


def test_chain_prompts_show_the_expected_answer(chain_setup, tmp_path, tokenizer_dir):
    from demo.app import chain_example_rows, expected_answer_text

    pool, _, _, _ = chain_setup
    dirs, [example] = chain_family(tmp_path, tokenizer_dir)
    assert f"**{example['answer']}**" in expected_answer_text(example["prompt"])
    assert expected_answer_text("def f(x):\n") == ""
    rows, labels = chain_example_rows([example], {"plt-chains-L1": dirs[0], "plt-chains-L2": dirs[1]})
    assert rows == [[example["prompt"], "plt-chains-L1", "1", "plt-chains-L2", "2"]]
    assert labels == [f"depth 2: L=1 says x, L=2 says {example['answer']} "
                      f"(answer {example['answer']})"]
    assert chain_example_rows([example], {"plt-chains-L1": dirs[0]}) == ([], [])
    # each column's stats name the answer and whether the column gave it
    (text, stats), *empty = run_compare(compare_handler(pool, Limits(), {"torch": None}),
                                  example["prompt"], 1, [("tiny", "torch", 1, "clp")])
    given = text[len(example["prompt"]):].split()[0]
    verdict = "✓ right" if given == example["answer"] else f"✗ wrong (gave {given})"
    assert stats.endswith(f"expected answer **{example['answer']}** · {verdict}")
    assert all(column == ("", "") for column in empty)


def test_chain_examples_set_the_model_and_loops_of_two_columns(tmp_path, tokenizer_dir):
    """What the browser test below clicks, checked where there is no browser: an example's
    values go to the prompt and the model and loops of columns 1 and 2."""
    import gradio as gr

    dirs, examples = chain_family(tmp_path, tokenizer_dir)
    app = build_app(dirs, backends={"torch": None}, chain_examples=examples)
    app.pool.close()
    dataset, = [block for block in app.blocks.values()
                if isinstance(block, gr.Dataset) and block.elem_id == "chain-examples"]
    assert [c.elem_id for c in dataset._components] == ["prompt", "model-0", "loops-0",
                                                        "model-1", "loops-1"]


@pytest.fixture
def served_chain_demo(tmp_path, tokenizer_dir):
    dirs, examples = chain_family(tmp_path, tokenizer_dir)
    app = build_app(dirs, Limits(max_new_tokens=8), backend_options={"torch": {"threads": 1}},
                    backends={"torch": None}, chain_examples=examples)
    _, url, _ = launch(app, host="127.0.0.1", port=free_port(), prevent_thread_lock=True,
                       quiet=True)
    yield url, examples[0]
    app.close()
    app.pool.close()


@requires("torch")
@requires("playwright")
@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM}")
def test_browser_chain_example_shows_the_answer_next_to_the_columns(served_chain_demo):
    from playwright.sync_api import sync_playwright

    url, example = served_chain_demo
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="networkidle")
            page.locator("#chain-examples").get_by_text("depth 2:").click()
            page.wait_for_function(
                f"document.querySelector('#expected-answer')?.innerText.includes("
                f"'Expected answer: {example['answer']}')", timeout=30_000)
            prompt = page.locator("#prompt textarea").input_value()
            models = [page.locator(f"#model-{i} input").input_value() for i in range(2)]
            loops = [page.locator(f"#loops-{i} input").input_value() for i in range(2)]
            stats = run_two_columns(page)
        finally:
            browser.close()
    assert prompt == example["prompt"]
    assert models == ["plt-chains-L1", "plt-chains-L2"] and loops == ["1", "2"]
    for stat in stats:
        assert f"expected answer {example['answer']} · " in stat
        assert "✓ right" in stat or "✗ wrong" in stat


@requires("torch")
@pytest.mark.load
def test_load_eight_concurrent_clients(served_demo):
    from gradio_client import Client

    duration_s, n_clients = 30.0, 8
    results, failures = [], []

    def client_loop(k):
        try:
            client = Client(served_demo, verbose=False)
        except Exception as exc:  # noqa: BLE001 - counted as a failure below
            failures.append(f"client {k}: connect: {exc!r}")
            return
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            try:
                out = client.predict("def add(a, b):\n", 2, 16, 0.7, 0.95, 40, 1.1, k, True,
                                     **settings(*[("model-plt-0", "torch", n, "clp")
                                                  for n in range(1, 5)]),
                                     api_name="/compare")
            except Exception as exc:  # noqa: BLE001
                failures.append(f"client {k}: {exc!r}")
                continue
            results.append(out)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration_s + 120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    print(f"load test: {len(results)} two-column comparisons by {n_clients} clients in "
          f"{duration_s:.0f} s, {len(failures)} failures")
    assert failures == []
    assert len(results) >= n_clients
    for out in results:
        for i in range(2):
            assert out[2 * i].startswith("def add(a, b):\n") and "finish:" in out[2 * i + 1]
