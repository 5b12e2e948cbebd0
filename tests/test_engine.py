"""The continuous-batching engine (runtimes/engine.py) without HTTP: the width of a running
batch follows its sequences (re-laid out exactly), cancellation frees a slot, a full queue
and a closed engine refuse requests, and shutdown ends every request."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time

import pytest

from conftest import ConstantBackend, greedy_run, random_prompts, requires
from plt_port.tokenizer import Tokenizer
from runtimes.backends import load_backend
from runtimes.engine import (BatchEngine, EngineClosedError, QueueFullError, Request,
                             RunningBatch, RunningSequence, TokenEvent, batch_width)
from runtimes.sequence import SequenceText
from runtimes.sampling import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_width_is_the_next_power_of_two_within_max_batch():
    assert [batch_width(n, 16) for n in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
    assert batch_width(9, 12) == 12


def test_a_running_batch_grows_and_narrows_and_decodes_exactly(make_model, tokenizer_dir):
    """Sequences join a batch one by one (widths 1, 2, 4), two leave (width 1 again): every
    remaining sequence decodes what it decodes alone."""
    backend = load_backend("torch", make_model("plt"), loops=3)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    batch = RunningBatch(backend, max_batch=8)
    prompts = random_prompts([5, 12, 9], seed=2)
    widths, sequences = [], []
    for prompt in prompts:
        state, logits = backend.prefill([prompt], len(prompt) + 6)
        sequence = RunningSequence(Request(prompt, 7, print), SequenceText(tokenizer, prompt, 7),
                                   Sampler(), len(prompt) + 6, int(logits[0].argmax()))
        batch.add(sequence, state)
        sequences.append(sequence)
        widths.append(batch.state.batch_size)
    decoded = {id(s): [s.last_token] for s in sequences}

    def step():
        logits = batch.step_async()()
        for slot, sequence in enumerate(batch.slots):
            if sequence is not None:
                sequence.last_token = int(logits[slot].argmax())
                decoded[id(sequence)].append(sequence.last_token)

    step()
    batch.release([batch.slots.index(sequences[0]), batch.slots.index(sequences[2])])
    widths.append(batch.state.batch_size)
    step()
    assert widths == [1, 2, 4, 1] and batch.slots == [sequences[1]]
    alone, history, _ = greedy_run(backend, [prompts[1]], 2)
    expected = alone[0][len(prompts[1]):] + [int(history[-1][0].argmax())]
    assert decoded[id(sequences[1])] == expected
    batch.release([0])
    assert batch.state is None and batch.slots == []


@pytest.fixture
def engine(make_model):
    model_dir = make_model()
    engine = BatchEngine(lambda loops: ConstantBackend(model_dir, loops),
                         Tokenizer.from_dir(model_dir), max_batch=2, max_queue=2).start()
    yield engine
    engine.close()


LONG = 500  # new tokens of a request that runs for seconds (5 ms a step)


def submit(engine, max_new_tokens: int) -> tuple[Request, queue.Queue]:
    events = queue.Queue()
    request = Request([1, 2, 3], max_new_tokens, events.put)
    engine.submit(request)
    return request, events


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_cancel_frees_the_slot_and_a_waiting_request_takes_it(engine):
    first, first_events = submit(engine, LONG)
    second, _ = submit(engine, LONG)
    wait_for(lambda: engine.running_count == 2)
    third, third_events = submit(engine, 3)
    assert engine.queued_count == 1
    first.cancel()
    events = [third_events.get(timeout=10) for _ in range(3)]
    assert all(isinstance(e, TokenEvent) for e in events) and events[-1].finish_reason == "length"
    assert isinstance(first_events.get(timeout=10), TokenEvent)
    second.cancel()
    wait_for(lambda: engine.running_count == 0)


def test_a_full_queue_refuses_and_close_ends_every_request(engine):
    requests = [submit(engine, LONG) for _ in range(2)]
    wait_for(lambda: engine.running_count == 2)
    waiting = [submit(engine, LONG) for _ in range(2)]
    with pytest.raises(QueueFullError):
        submit(engine, 2)
    engine.close()
    assert not engine.thread.is_alive()
    for _, events in requests + waiting:
        while isinstance(event := events.get(timeout=10), TokenEvent):
            pass
        assert isinstance(event, EngineClosedError)
    with pytest.raises(EngineClosedError):
        submit(engine, 2)


@requires("mlx")
def test_an_mlx_engine_exits_cleanly(make_model):
    """MLX streams are thread-local: the engine thread releases its own before it ends, or
    the process aborts at exit ("terminate called without an active exception")."""
    script = f"""
import queue
from plt_port.tokenizer import Tokenizer
from runtimes.backends import load_backend
from runtimes.engine import BatchEngine, Request
model_dir = {make_model()!r}
engine = BatchEngine(lambda loops: load_backend("mlx", model_dir, loops=loops),
                     Tokenizer.from_dir(model_dir)).start()
events = queue.Queue()
engine.submit(Request([1, 2, 3], 3, events.put))
while not events.get(timeout=60).finish_reason:
    pass
engine.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=os.environ | {"PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-2000:]


def test_siblings_share_one_prefill_and_decode_as_they_would_alone(make_model, tokenizer_dir):
    """A request with two siblings (OpenAI's n=3): one prefill, three sequences, each with its
    own seeded sampler, each equal to the same request run alone; more sequences of one
    prompt than max_batch are refused."""
    from runtimes.engine import EngineError
    from runtimes.sampling import SamplingParams

    model_dir = make_model("plt")
    engine = BatchEngine(lambda loops: load_backend("torch", model_dir, loops=loops),
                         Tokenizer.from_dir(tokenizer_dir), max_batch=4).start()
    prefills = []
    original = engine.backend.prefill
    engine.backend.prefill = lambda *a, **k: prefills.append(1) or original(*a, **k)
    prompt = random_prompts([9], seed=4)[0]

    def run(seeds):
        results = [queue.Queue() for _ in seeds]
        requests = [Request(prompt, 6, results[i].put, SamplingParams(temperature=1.0, seed=s))
                    for i, s in enumerate(seeds)]
        requests[0].siblings = requests[1:]
        engine.submit(requests[0])
        tokens = []
        for result in results:
            events = [result.get(timeout=30)]
            while events[-1].finish_reason is None:
                events.append(result.get(timeout=30))
            tokens.append([e.token for e in events])
        return tokens

    try:
        together = run([1, 2, 3])
        assert len(prefills) == 1 and len({tuple(t) for t in together}) == 3
        assert together == [run([seed])[0] for seed in (1, 2, 3)]
        with pytest.raises(EngineError, match="5 sequences"):
            engine.submit(Request(prompt, 2, print, siblings=[Request(prompt, 2, print)] * 4))
    finally:
        engine.close()
