"""`Backend.rewind` (SPEC section 4, "Rewinding"), for every backend, both checkpoint formats
and loops 1..4: a slot rewound to p and fed tokens p..m gives the logits of a cold prefill
of m tokens (and 16 greedy steps after it), whether the rewind undoes its journal, restores a
snapshot or prefills its tokens again, over rewound distances shorter and longer than the
window (8 keys here). Plus the speculative-decoding pattern (a verify chunk, then the
rejected tail dropped) and rewinds of one slot of a running batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import LOUD_STD, random_prompts, tiny_config
from plt_port.random_model import save_random_model
from runtimes.backends import BackendError, load_backend
from runtimes.backends.history import HistoryPolicy

TOL = 1e-5  # fp32: a rewound state and a cold one differ only by chunking's rounding
STEPS = 16
TOKENS = random_prompts([48], seed=11)[0]
PREFILLED = 30
# (p, m): rewound distance 3 (< window), 20 (> window), to 0, to n (no-op)
CASES = [(27, 34), (10, 36), (0, 12), (PREFILLED, 38)]
POLICIES = {"journal": HistoryPolicy(depth=64), "snapshots": HistoryPolicy(snapshot_every=4),
            "tokens": HistoryPolicy()}


def greedy(backend, state, logits, steps=STEPS) -> np.ndarray:
    """logits [steps + 1, B, V]: the given ones, then each greedy step's."""
    out = [logits]
    for _ in range(steps):
        logits = backend.step(state, logits.argmax(-1))
        out.append(logits)
    return np.stack(out)


def cold_run(backend, m: int) -> np.ndarray:
    state, logits = backend.prefill([TOKENS[:m]], 64)
    return greedy(backend, state, logits)


def count_prefilled_tokens(backend, monkeypatch) -> list[int]:
    """Tokens every later prefill chunk runs (a list of one counter)."""
    count = [0]
    chunk = backend.prefill_chunk

    def counted(caches, ids, start, num_new, trace=False):
        count[0] += int(num_new.max())
        return chunk(caches, ids, start, num_new, trace=trace)

    monkeypatch.setattr(backend, "prefill_chunk", counted)
    return count


@pytest.mark.parametrize("fmt", ["plt", "v1"])
@pytest.mark.parametrize("loops", [1, 2, 3, 4])
def test_rewind_then_feed_equals_a_cold_prefill(backend_name, model_dirs, fmt, loops):
    backend = load_backend(backend_name, model_dirs[fmt], loops=loops)
    cold = {m: cold_run(backend, m) for m in sorted({m for _, m in CASES})}
    for policy_name, policy in POLICIES.items():
        for p, m in CASES:
            state, _ = backend.prefill([TOKENS[:PREFILLED]], 64, chunk_size=7, history=policy)
            backend.rewind(state, 0, p)
            assert state.lengths.tolist() == [p]
            got = greedy(backend, state, backend.extend(state, TOKENS[p:m]))
            error = np.abs(got - cold[m]).max()
            assert error <= TOL, f"{policy_name}: rewind {PREFILLED} -> {p}, fed to {m}: {error}"


@pytest.mark.parametrize("policy_name,expected", [
    ("journal", 0),             # undo only: nothing prefilled again
    ("snapshots", 10 - 8),      # from the snapshot at 8 to 10
    ("tokens", 10),             # from the start
])
def test_each_mechanism_prefills_what_it_says(model_dirs, monkeypatch, policy_name, expected):
    backend = load_backend("torch", model_dirs["plt"], loops=3)
    state, _ = backend.prefill([TOKENS[:PREFILLED]], 64, chunk_size=7,
                               history=POLICIES[policy_name])
    prefilled = count_prefilled_tokens(backend, monkeypatch)
    backend.rewind(state, 0, 10)
    assert prefilled[0] == expected


def test_speculative_verify_chunk_then_drop_the_rejected_tail(backend_name, model_dirs):
    """Per step: a chunk of k + 1 = 5 tokens from the current state (the last token and 4
    drafts), then keep a + 1 of them (a = 0..4 accepted drafts): the state equals a cold one
    of the kept tokens, every time, with the journal no deeper than the chunk."""
    backend = load_backend(backend_name, model_dirs["plt"], loops=3)
    state, _ = backend.prefill([TOKENS[:6]], 64, history=HistoryPolicy(depth=5))
    length = 6
    for accepted in (2, 0, 4, 1, 3):
        drafts = TOKENS[length:length + 5]
        backend.extend(state, drafts)
        backend.rewind(state, 0, length + accepted + 1)
        length += accepted + 1
        cold_state, _ = backend.prefill([TOKENS[:length]], 64)
        expected = backend.step(cold_state, np.array([TOKENS[length]]))
        got = backend.step(state, np.array([TOKENS[length]]))
        backend.rewind(state, 0, length)
        assert np.abs(got - expected).max() <= TOL, f"after keeping {accepted + 1}"
    assert sum(r.count for r in state.history.slots[0].journal) <= 5 + 4


@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_one_slot_of_a_running_batch_rewinds_alone(backend_name, model_dirs, fmt):
    """A batch of two decodes 14 steps; slot 0 is rewound 11 of them (more than the window)
    by its journal, slot 1 to inside its prompt, before its journal, by prefilling it again.
    Both then decode what cold states of their kept tokens decode."""
    backend = load_backend(backend_name, model_dirs[fmt], loops=2)
    prompts = random_prompts([9, 14], seed=4)
    batch = backend.empty_state(2, 64, history=HistoryPolicy(depth=32))
    for slot, prompt in enumerate(prompts):
        one, _ = backend.prefill([prompt], 64, history=HistoryPolicy(depth=32 if slot == 0 else 0))
        backend.write_slot(batch, slot, one)
    answers = random_prompts([14, 14], seed=5)
    for step in range(14):
        backend.step(batch, np.array([answers[0][step], answers[1][step]]))
    kept = [(prompts[0] + answers[0])[:len(prompts[0]) + 3], prompts[1][:11]]
    alone = backend.slot_state(batch, 0)  # its journal holds its own rows only
    for record in alone.history.slots[0].journal:
        assert {len(a) for a in record.ring_rows + (record.carries or [])} == {1}
    backend.rewind(alone, 0, len(kept[0]))
    backend.rewind(batch, 0, len(kept[0]))
    backend.rewind(batch, 1, len(kept[1]))
    assert batch.lengths.tolist() == [len(k) for k in kept]
    next_tokens = np.array([7, 9])
    got = backend.step(batch, next_tokens)
    got_alone = backend.step(alone, next_tokens[:1])
    for b in range(2):
        cold, _ = backend.prefill([kept[b]], 64)
        expected = backend.step(cold, next_tokens[b:b + 1])
        assert np.abs(got[b] - expected[0]).max() <= TOL, f"slot {b}"
    assert np.abs(got_alone - got[:1]).max() <= TOL


def test_rewinds_without_history(model_dirs):
    """Without history a rewind works only where it needs no restore (L = 1, or a v1 ring
    that never wrapped, or to 0); elsewhere it is one clear error, like a bad position."""
    plain = load_backend("torch", model_dirs["plt"], loops=1)
    state, _ = plain.prefill([TOKENS[:PREFILLED]], 64)
    plain.rewind(state, 0, 5)
    assert state.lengths.tolist() == [5]
    v1 = load_backend("torch", model_dirs["v1"], loops=2)
    short, _ = v1.prefill([TOKENS[:6]], 64)  # 6 <= window 8: the rings never wrapped
    v1.rewind(short, 0, 2)
    looped = load_backend("torch", model_dirs["plt"], loops=2)
    state, _ = looped.prefill([TOKENS[:PREFILLED]], 64)
    with pytest.raises(BackendError, match="history"):
        looped.rewind(state, 0, 5)
    looped.rewind(state, 0, 0)
    for bad in (-1, PREFILLED + 1, 2.5, True):
        with pytest.raises(BackendError, match="rewind"):
            looped.rewind(state, 0, bad)
    with pytest.raises(BackendError, match="one sequence"):
        looped.extend(looped.empty_state(2, 16), [1, 2])


def test_the_journal_keeps_its_depth(model_dirs):
    backend = load_backend("torch", model_dirs["plt"], loops=2)
    state, logits = backend.prefill([TOKENS[:PREFILLED]], 128, history=HistoryPolicy(depth=6))
    greedy(backend, state, logits, steps=20)
    journal = state.history.slots[0].journal
    assert journal[-1].end == PREFILLED + 20
    assert 6 <= PREFILLED + 20 - journal[0].start < 6 + 8  # a chunk at most wider than depth


@pytest.mark.parametrize("fmt,layers,loops", [("plt", 2, 2), ("plt", 3, 3), ("v1", 2, 3)])
def test_an_exact_recompute_needs_every_layers_receptive_field(tmp_path, fmt, layers, loops):
    """Rebuilding the rings and carry after p tokens from the global K/V: (L-1) x window + 1
    recomputed positions give wrong logits once N >= 2 layers (each layer's local branch
    reaches window - 1 further back); `exact_recompute_span` positions give the full
    forward's logits exactly, and one position fewer does not."""
    from plt_port.config import PLTConfig
    from runtimes.rewind_study import exact_recompute_span, recompute_errors

    model_dir = save_random_model(tmp_path / "m", tiny_config(fmt, num_hidden_layers=layers),
                                  0, std=LOUD_STD)
    config = PLTConfig.from_file(model_dir)
    exact = exact_recompute_span(config, loops)
    too_short = (loops - 1) * (config.window - 1) + 1
    errors = recompute_errors(model_dir, loops, random_prompts([120], seed=1)[0], 100,
                              [too_short, exact - 1, exact])
    assert errors[too_short] > 1e-3 and errors[exact - 1] > 0 and errors[exact] <= 1e-6, errors
