"""Speculative decoding (`runtimes.speculative`): greedy output identical to plain decoding on
every backend, both checkpoint formats and loops 1..4, with drafts that hit and miss (a
scripted proposer rejects at the first draft, at the last, or at none; prompt lookup on a
repetitive prompt and a random one), eos, stop strings and max_new_tokens inside an accepted
run, a draft model kept in step by rewinds, the engine's one-request rule, and the sampling
rule checked by a chi-square test of the token drawn after a draft.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from conftest import LOUD_STD, random_prompts, tiny_config
from plt_port.random_model import save_random_model
from plt_port.tokenizer import Tokenizer
from runtimes.backends import load_backend
from runtimes.backends.history import HistoryPolicy
from runtimes.engine import EngineCore, Request
from runtimes.generate import generate, stream_generate
from runtimes.sampling import Sampler, SamplingParams
from runtimes.speculative import (Backoff, NgramProposer, Speculation, SpeculativeConfig,
                                  SpeculativeError, speculative_config, verify_drafts)

K = 4
NEW = 24
REPETITIVE = random_prompts([12], seed=3)[0] * 3  # prompt lookup finds continuations
RANDOM = random_prompts([30], seed=4)[0]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


class ScriptedProposer:
    """Drafts the plain run's own continuation, with draft `wrong_at` of every proposal
    replaced by another token (None: every draft right)."""

    def __init__(self, prompt, plain_tokens, wrong_at):
        self.answer = list(prompt) + list(plain_tokens)
        self.wrong_at = wrong_at
        self.proposals = 0

    def propose(self, context, k):
        assert list(context) == self.answer[:len(context)]  # the engine's context is exact
        drafts = self.answer[len(context):len(context) + k]
        if self.wrong_at is not None and self.wrong_at < len(drafts):
            drafts[self.wrong_at] = (drafts[self.wrong_at] + 1) % 512
        self.proposals += 1
        return drafts


def speculation_with(proposer, k=K) -> Speculation:
    speculation = Speculation(SpeculativeConfig("ngram", k))
    speculation.proposer = lambda: proposer
    return speculation


def engine_events(backend, tokenizer, prompt, speculation=None, **request):
    """Every event the engine emits for one request (none may follow its last)."""
    core = EngineCore(lambda _: backend, tokenizer, max_batch=1, speculation=speculation).open()
    events = []
    request = Request(list(prompt), emit=events.append, sampling=GREEDY, **request)
    core.add(request, core.check(request))
    while not core.idle:
        core.turn()
    assert [e.finish_reason is not None for e in events] == [False] * (len(events) - 1) + [True]
    return events


def tokens_of(backend, tokenizer, prompt, speculation=None, **options):
    out, last = [], None
    for last in stream_generate(backend, tokenizer, prompt, sampling=options.pop("sampling", GREEDY),
                                speculation=speculation, add_bos=False, **options):
        out.append(last.token)
    return out, last


@pytest.mark.parametrize("fmt", ["plt", "v1"])
@pytest.mark.parametrize("loops", [1, 2, 3, 4])
def test_greedy_output_is_plain_decoding(backend_name, model_dirs, tokenizer, fmt, loops):
    backend = load_backend(backend_name, model_dirs[fmt], loops=loops)
    for prompt in (REPETITIVE, RANDOM):
        plain, _ = tokens_of(backend, tokenizer, prompt, max_new_tokens=NEW)
        for wrong_at in (0, K - 1, None):  # rejected at the first draft, the last, none
            proposer = ScriptedProposer(prompt, plain, wrong_at)
            got, last = tokens_of(backend, tokenizer, prompt, speculation_with(proposer),
                                  max_new_tokens=NEW)
            assert got == plain, (prompt is RANDOM, wrong_at)
            stats = last.speculative
            assert stats.verifies == proposer.proposals > 0
            expected_per_verify = {0: 1.0, K - 1: K, None: K + 1}[wrong_at]
            if wrong_at != 0:
                assert stats.tokens_per_verify > 1.5  # (the last verifies are shorter)
            assert stats.tokens_per_verify <= expected_per_verify
            if wrong_at == 0:
                assert stats.accepted == 0
        got, last = tokens_of(backend, tokenizer, prompt,
                              Speculation(SpeculativeConfig("ngram", K, 2)), max_new_tokens=NEW)
        assert got == plain


def test_ngram_proposer_takes_the_most_recent_longest_match():
    proposer = NgramProposer(max_n=3)
    # 1 2 3 at 0 (n = 3) wins over the more recent 2 3 at 6 (n = 2)
    assert proposer.propose([1, 2, 3, 9, 9, 7, 2, 3, 8, 6, 1, 2, 3], 2) == [9, 9]
    assert proposer.propose([1, 2, 8, 1, 2, 9, 1, 2], 3) == [9, 1, 2]  # the most recent 1 2
    assert NgramProposer(max_n=1).propose([1, 2, 8, 1, 2, 9, 1, 2], 1) == [9]
    assert proposer.propose([4, 5, 6], 3) == []       # no earlier match
    assert proposer.propose([7, 7, 7, 7], 5) == [7] * 5  # copied on from its own drafts
    assert proposer.propose([5, 1, 2, 3, 1, 2, 3], 5) == [1, 2, 3, 1, 2]


def test_eos_stop_and_max_tokens_inside_an_accepted_run(model_dirs, tokenizer, tmp_path):
    source = model_dirs["plt"]
    backend = load_backend("torch", source, loops=2)
    plain, _ = tokens_of(backend, tokenizer, REPETITIVE, max_new_tokens=NEW)
    all_right = ScriptedProposer(REPETITIVE, plain, None)
    # max_new_tokens lands inside what a verify would accept
    for limit in (3, 7, 9):
        got, last = tokens_of(backend, tokenizer, REPETITIVE, speculation_with(all_right),
                              max_new_tokens=limit)
        assert got == plain[:limit] and last.finish_reason == "length"
    # a stop string completed by each of tokens 3..10: the last sampled token a verify
    # starts from, or an accepted draft
    text = [tokenizer.decode([t]) for t in plain]
    for i in range(3, 11):
        stop = "".join(text[i - 1:i + 1])
        if not stop.strip():
            continue
        expected, _ = generate(backend, tokenizer, REPETITIVE, max_new_tokens=NEW,
                               sampling=GREEDY, stop=[stop], add_bos=False)
        events = engine_events(backend, tokenizer, REPETITIVE, speculation_with(all_right),
                               max_new_tokens=NEW, stop=[stop])
        assert "".join(e.text for e in events) == expected and events[-1].finish_reason == "stop"
    # a stop string made of the text of tokens 5..6 of the plain answer
    stop = next(text[i] + text[i + 1] for i in range(5, NEW - 1)
                if (text[i] + text[i + 1]).strip())
    plain_text, plain_last = generate(backend, tokenizer, REPETITIVE, max_new_tokens=NEW,
                                      sampling=GREEDY, stop=[stop], add_bos=False)
    spec_text, spec_last = generate(backend, tokenizer, REPETITIVE, max_new_tokens=NEW,
                                    sampling=GREEDY, stop=[stop], add_bos=False,
                                    speculation=speculation_with(all_right))
    assert (spec_text, spec_last.finish_reason, spec_last.generation_tokens) == \
        (plain_text, plain_last.finish_reason, plain_last.generation_tokens)
    assert plain_last.finish_reason == "stop" and spec_last.speculative.accepted > 0
    events = engine_events(backend, tokenizer, REPETITIVE, speculation_with(all_right),
                           max_new_tokens=NEW, stop=[stop])
    assert "".join(e.text for e in events) == plain_text
    # token 6 of the plain answer made the model's eos
    with_eos = shutil.copytree(source, tmp_path / "with-eos")
    eos = plain[6]
    (with_eos / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    backend = load_backend("torch", str(with_eos), loops=2)
    expected = plain[:plain.index(eos) + 1]
    got, last = tokens_of(backend, tokenizer, REPETITIVE, max_new_tokens=NEW)
    assert got == expected and last.finish_reason == "stop"
    events = engine_events(backend, tokenizer, REPETITIVE, speculation_with(all_right),
                           max_new_tokens=NEW)
    assert [e.token for e in events] == expected and events[-1].finish_reason == "stop"


@pytest.mark.parametrize("draft", ["itself", "one loop", "another model"])
def test_draft_model_proposer(model_dirs, tokenizer, tmp_path, tokenizer_dir, draft):
    backend = load_backend("torch", model_dirs["plt"], loops=3)
    draft_dir, draft_loops = {
        "itself": (model_dirs["plt"], 3), "one loop": (model_dirs["plt"], 1),
        "another model": (save_random_model(tmp_path / "draft", tiny_config("plt"), 5,
                                            tokenizer_dir=tokenizer_dir, std=LOUD_STD), 2)}[draft]
    speculation = Speculation(SpeculativeConfig("draft", K, draft_model=draft_dir,
                                                draft_loops=draft_loops),
                              lambda path, loops: load_backend("torch", path, loops=loops))
    proposals = []
    make_proposer = speculation.proposer

    def recording_proposer():
        proposer = make_proposer()
        propose = proposer.propose
        proposer.propose = lambda context, k: proposals.append(
            (list(context), propose(context, k))) or proposals[-1][1]
        return proposer

    speculation.proposer = recording_proposer
    for prompt in (REPETITIVE, RANDOM):
        plain, _ = tokens_of(backend, tokenizer, prompt, max_new_tokens=NEW)
        got, last = tokens_of(backend, tokenizer, prompt, speculation, max_new_tokens=NEW)
        assert got == plain
        if draft == "itself":
            assert last.speculative.acceptance_rate == 1.0
    # each proposal is the draft model's greedy continuation of its context, computed cold
    # (the draft state, rewound and extended between proposals, never out of step)
    draft_backend = speculation.draft_backend
    assert len(proposals) > 4
    for context, drafts in proposals:
        state, logits = draft_backend.prefill([context], len(context) + K)
        cold = []
        for _ in drafts:
            cold.append(int(logits[0].argmax()))
            logits = draft_backend.step(state, np.array(cold[-1:]))
        assert cold == drafts


def test_refusals_name_the_option(model_dirs, tokenizer, tmp_path, tokenizer_dir):
    with pytest.raises(SpeculativeError, match="--ngram-size needs --speculative"):
        speculative_config("off", None, 3, None)
    with pytest.raises(SpeculativeError, match="needs --draft-model"):
        speculative_config("draft", 4, None, None)
    with pytest.raises(SpeculativeError, match="num_tokens must be an integer in 1..64"):
        speculative_config("ngram", 100, None, None)
    with pytest.raises(SpeculativeError, match="method must be one of"):
        SpeculativeConfig("medusa")
    assert speculative_config("off", None, None, None) is None
    with pytest.raises(SpeculativeError, match="--draft-loops needs --speculative draft"):
        speculative_config("ngram", None, None, None, 2)
    backend = load_backend("torch", model_dirs["plt"], loops=2)
    other = save_random_model(tmp_path / "big-vocab", tiny_config("plt", vocab_size=600), 0,
                              tokenizer_dir=tokenizer_dir, std=LOUD_STD)
    speculation = Speculation(SpeculativeConfig("draft", K, draft_model=other),
                              lambda path, loops: load_backend("torch", path, loops=loops))
    with pytest.raises(SpeculativeError, match="same tokenizer"):
        generate(backend, tokenizer, RANDOM, max_new_tokens=4, speculation=speculation)
    backend.supports_verify = False
    with pytest.raises(SpeculativeError, match="the torch backend cannot verify drafts"):
        generate(backend, tokenizer, RANDOM, max_new_tokens=4,
                 speculation=Speculation(SpeculativeConfig()))


def test_engine_speculates_only_for_a_request_running_alone(model_dirs, tokenizer):
    """Two requests side by side decode plainly; once the shorter one has finished, the
    other runs alone (its batch narrowed to one slot) and speculates; outputs unchanged."""
    backend = load_backend("torch", model_dirs["plt"], loops=2)
    runs = [(REPETITIVE, NEW), (RANDOM + REPETITIVE[:8], NEW // 3)]
    plain = [tokens_of(backend, tokenizer, p, max_new_tokens=n)[0] for p, n in runs]
    speculation = Speculation(SpeculativeConfig("ngram", K, 1))
    core = EngineCore(lambda _: backend, tokenizer, max_batch=2, speculation=speculation).open()
    events = [[] for _ in runs]
    for (prompt, new), received in zip(runs, events):
        request = Request(list(prompt), new, emit=received.append, sampling=GREEDY)
        core.add(request, core.check(request))
    verifies_while_two_ran = None
    while not core.idle:
        core.turn()
        if verifies_while_two_ran is None and events[1][-1].finish_reason:
            verifies_while_two_ran = speculation.stats.verifies
    assert [[e.token for e in received] for received in events] == plain
    assert verifies_while_two_ran == 0
    assert events[0][-1].stats.speculative.verifies == speculation.stats.verifies > 0


def first_token_draws(backend, prompt, draft, params, seeds) -> np.ndarray:
    """The token kept after `prompt` + token 7 when `draft` is proposed after it, one draw
    per seed (the state rewound between draws)."""
    state, _ = backend.prefill([prompt], len(prompt) + 8, history=HistoryPolicy(depth=4))
    start = int(state.lengths[0])
    kept = []
    for seed in seeds:
        sampler = Sampler(SamplingParams(**params, seed=seed))
        picked = []

        def target(row, sampler=sampler, picked=picked):
            picked.append(int(sampler(row[None], [prompt + [7]])[0]))
            return picked[-1]

        verify_drafts(backend, state, 7, [draft], target, lambda token: True)
        kept.append(picked[0])
        backend.rewind(state, 0, start)
    return np.array(kept)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_keeps_the_target_distribution(model_dirs):
    """Over 1500 fixed seeds at temperature 1 and top-k 6, the token after a verify's first
    row follows the target's distribution (softmax of the top 6 of a plain decode step's
    logits), whether the draft is the most likely token (accepted with p(d)) or one outside
    the top k (always rejected: a forced miss). Chi-square, 5 degrees of freedom: 20.5 is
    the 0.001 critical value."""
    backend = load_backend("torch", model_dirs["plt"], loops=2)
    prompt = RANDOM[:12]
    state, _ = backend.prefill([prompt], 16)
    logits = backend.step(state, np.array([7]))[0].astype(np.float64)
    top = np.argsort(-logits)[:6]
    probs = np.exp(logits[top] - logits[top].max())
    probs /= probs.sum()
    assert probs.max() < 0.9  # a spread distribution: the test can tell the rules apart
    params = dict(temperature=1.0, top_k=6)
    outside = int(np.argsort(-logits)[100])
    for draft in (int(top[0]), outside):
        draws = first_token_draws(backend, prompt, draft, params, range(1500))
        assert set(draws.tolist()) <= set(top.tolist())
        counts = np.array([(draws == t).sum() for t in top])
        assert chi_square(counts, probs) < 20.5, (draft, counts, probs)


COPY_PROMPT = "def area(w, h):\n    return w * h\n\n\ndef area(w, h):\n"


def test_generate_cli_prints_the_same_text_and_the_speculative_stats(capsys):
    from plt_port.app.cli import main

    runs = {}
    for flags in ([], ["--speculative", "ngram", "--num-speculative-tokens", "3"]):
        assert main(["generate", "--max-tokens", "24", "--temp", "0", *flags, COPY_PROMPT]) == 0
        runs[bool(flags)] = capsys.readouterr()
    assert runs[True].out == runs[False].out
    assert "speculative:" not in runs[False].err
    assert re.search(r"speculative: \d+/\d+ drafts accepted \(\d+%\), [\d.]+ tokens/verify "
                     r"over [1-9]\d* verifies", runs[True].err)
    assert main(["generate", "--ngram-size", "2", "x"]) == 1
    assert "--ngram-size needs --speculative ngram" in capsys.readouterr().err


def test_draft_loops_option_sets_the_loop_count_the_draft_model_loads_at(model_dirs):
    from plt_port.app.cli import parse
    from plt_port.app.commands.generate import speculation_from

    flags = ["--backend", "torch", "--speculative", "draft", "--draft-model", model_dirs["plt"]]
    for extra, loops in (([], load_backend("torch", model_dirs["plt"]).loops),
                         (["--draft-loops", "1"], 1), (["--draft-loops", "3"], 3)):
        speculation = speculation_from(parse(["generate", *flags, *extra, "x"]))
        assert speculation.proposer().backend.loops == loops


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_help_names_the_speculative_options(command, capsys):
    from plt_port.app.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--speculative {off,ngram,draft}" in out and "--num-speculative-tokens K" in out
    assert "--draft-loops L" in out
    assert "decodes one request alone" in out


def test_server_usage_and_metrics_count_the_drafts():
    from plt_port.family import default_model_dir

    from test_server import serve

    running = serve(default_model_dir(), speculation=Speculation(SpeculativeConfig("ngram", 3)))
    plain = serve(default_model_dir())
    try:
        body = dict(model=running.client.models.list().data[0].id, prompt=COPY_PROMPT,
                    max_tokens=24, temperature=0)
        spec = running.client.completions.create(**body)
        assert spec.choices[0].text == plain.client.completions.create(**body).choices[0].text
        usage = spec.usage.model_extra["speculative"]
        assert usage["verify_passes"] > 0 and 0 < usage["accepted_tokens"] <= \
            usage["drafted_tokens"]
        assert usage["tokens_per_verify"] == pytest.approx(
            (usage["accepted_tokens"] + usage["verify_passes"]) / usage["verify_passes"], abs=1e-3)
        metrics = running.get("/metrics").text
        for name, key in (("draft_tokens", "drafted_tokens"), ("accepted_tokens",
                                                               "accepted_tokens"),
                          ("verify_passes", "verify_passes")):
            value = re.search(rf"^plt_speculative_{name}_total (\S+)$", metrics, re.M).group(1)
            assert float(value) == usage[key]
        assert "speculative" not in plain.client.completions.create(**body).usage.model_extra
        # Anthropic's /v1/messages: the same extra in the usage, whole and streamed
        message = dict(model=body["model"], max_tokens=24, temperature=0,
                       messages=[{"role": "user", "content": COPY_PROMPT}])
        whole = running.post("/v1/messages", message).json()["usage"]
        assert whole["output_tokens"] == 24 and whole["speculative"]["verify_passes"] > 0
        assert whole["speculative"]["accepted_tokens"] <= whole["speculative"]["drafted_tokens"]
        delta = [event["usage"] for event in sse_events(running.post(
            "/v1/messages", message | {"stream": True})) if event["type"] == "message_delta"]
        assert delta == [{"output_tokens": 24, "speculative": whole["speculative"]}]
        assert "speculative" not in plain.post("/v1/messages", message).json()["usage"]
    finally:
        running.stop()
        plain.stop()


def sse_events(response) -> list[dict]:
    return [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines()
            if line.startswith("data: ")]


def test_bench_speculative_rows(tmp_path, capsys):
    from plt_port.app.cli import main

    out = tmp_path / "spec.json"
    tiny = "hidden_size=64,num_hidden_layers=2,intermediate_size=96,vocab_size=512"
    assert main(["bench", "--speculative", "ngram", "--random", tiny, "--loops", "1,2",
                 "--steps", "12", "--repeats", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "edit-this-file workload" in table and "tokens/verify" in table
    rows = json.loads(out.read_text())["speculative"][0]["rows"]
    assert [r["loops"] for r in rows] == [1, 2]
    for r in rows:
        assert r["identical"] and r["file_lines"] == 200
        assert r["speedup"] == pytest.approx(r["speculative_tps"] / r["plain_tps"])
        assert r["verify_ms"] > 0 and r["step_ms"] > 0


def test_seeded_sampling_penalties_and_grammar_give_the_plain_tokens():
    """Every kept token goes through the sequence's own sampler (penalties over its history,
    top-p, temperature, a grammar's mask) with one draw per token: seeded runs, constrained
    or not, give plain decoding's tokens, drafts right or wrong."""
    from plt_port import family
    from runtimes.grammar import model_compiler

    model_dir = family.default_model_dir()
    backend = load_backend("torch", model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    compiler = model_compiler(tokenizer, backend)
    prompt = tokenizer.encode(COPY_PROMPT * 2)
    for seed in range(3):
        sampling = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3,
                                  presence_penalty=0.5, seed=seed)
        for grammar in (None, compiler.regex(r"[a-z_]{1,12}\(\d{1,3}(, \d{1,3}){0,3}\)")):
            options = dict(max_new_tokens=20, sampling=sampling, grammar=grammar)
            plain, plain_last = tokens_of(backend, tokenizer, prompt, **options)
            for wrong_at in (1, None):
                proposer = ScriptedProposer(prompt, plain, wrong_at)
                got, last = tokens_of(backend, tokenizer, prompt, speculation_with(proposer),
                                      **options)
                assert got == plain and last.finish_reason == plain_last.finish_reason
                assert last.speculative.accepted > 0


def test_backoff_decodes_plainly_while_verifies_do_not_pay(model_dirs, tokenizer):
    backoff = Backoff()
    waits = []
    for accepted in (0, 0, 0, 0, 0, 0, 1, 0):  # at L = 2 a verify pays with one draft accepted
        backoff.note(accepted, 2)
        waits.append(backoff.waiting)
        while not backoff.ready():
            pass
    assert waits == [1, 2, 4, 8, 16, 16, 0, 1]
    backoff.note(2, 4)
    assert backoff.waiting == 2  # L = 4: 3 tokens for about 4 steps' cost
    # end to end: every first draft wrong, 40 tokens: a verify each time 1, 2, 4, 8, 16 plain
    # steps have passed (verifies from tokens 1, 3, 6, 11, 20 and 37)
    backend = load_backend("torch", model_dirs["plt"], loops=2)
    plain, _ = tokens_of(backend, tokenizer, REPETITIVE, max_new_tokens=40)
    proposer = ScriptedProposer(REPETITIVE, plain, 0)
    got, last = tokens_of(backend, tokenizer, REPETITIVE, speculation_with(proposer),
                          max_new_tokens=40)
    assert got == plain and last.speculative.verifies == proposer.proposals == 6
