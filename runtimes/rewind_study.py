"""What an exact rewind costs (SPEC section 4, "Rewinding"), for `plt-port bench --rewind`.

Two questions, measured rather than argued:

1. How far back must a recompute from the global cache start to rebuild a state's rings and
   carry exactly? `recompute_errors` runs the reference forward with loops >= 2 started
   afresh `span` positions before p (their keys before it dropped, their carry zero) and
   compares the logits from p on with the full forward's. The local branch of layer l at q
   reads loop r's K/V at q - window + 1..q, which come from layer l-1's local branch there,
   so the receptive field grows by window - 1 a layer, and loop r needs loop r-1 one position
   earlier: `exact_recompute_span`.
2. What each option costs on a real model: undo of a journal, restore of a snapshot, a
   prefill of the positions a snapshot or a recompute runs again, and the journal's
   recording per decode step; with the bytes each keeps (`plt_port.cache_layout`).
Timed states are marked written without a prefill (zero K/V, as `time_contexts` does):
a rewind, a restore or a chunk costs the same whatever the values.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from plt_port import cache_layout

from .backends.base import Backend, DecodeState
from .backends.history import HistoryPolicy, SlotHistory


def exact_recompute_span(config, loops: int) -> int:
    """Positions before p a recompute must run loops >= 2 from (the global K/V and loop 1
    being exact) for the state after p tokens to come out exact: (L-1) N (window-1), plus
    L-2 for the CLP shift of PLT (loop r's input at q is loop r-1's output at q-1)."""
    if loops == 1:
        return 0
    span = (loops - 1) * config.num_hidden_layers * (config.window - 1)
    return span if config.is_v1 else span + loops - 2


def cut_forward(model, ids: list[int], loops: int, cut: int) -> np.ndarray:
    """Logits [T, V] of the reference forward (plt_port.model) in which loops >= 2 start
    afresh at position `cut`: for queries >= cut their local keys before `cut` are dropped
    and, PLT, their carry into position `cut` is zero. Loop 1 (the global K/V) is exact."""
    import torch

    from plt_port.model import attend, causal_mask, gated_swa

    config = model.config
    positions = torch.arange(len(ids))
    cos, sin = model.rope(positions)
    full = causal_mask(positions, positions)
    local = causal_mask(positions, positions, config.window) & (
        (positions[None, :] >= cut) | (positions[:, None] < cut))
    with torch.no_grad():
        embeddings = model.model.embed_tokens(torch.tensor([ids]))
        global_kv, h = [], embeddings
        for r in range(1, loops + 1):
            for i, layer in enumerate(model.model.layers):
                def attention(q, k, v, x_res, i=i, r=r):
                    if r == 1:
                        global_kv.append((k, v))
                        return attend(q, k, v, full)[0]
                    return gated_swa(q, global_kv[i], full, (k, v), local,
                                     model.gate(i)(x_res, q))[0]

                h = layer(h, cos, sin, attention)
            if r < loops and not config.is_v1:
                carry = model.loop_carry(h)
                shifted = torch.cat([torch.zeros_like(carry[:, :1]), carry[:, :-1]], dim=1)
                if r >= 2:
                    shifted[:, cut] = 0  # loop r's output before `cut` is not recomputed
                h = model.next_loop_input(embeddings, shifted)
        return model.lm_logits(h)[0].float().numpy()


def recompute_errors(model_dir: str, loops: int, ids: list[int], position: int,
                     spans: list[int]) -> dict[int, float]:
    """Largest logit error, at positions >= `position`, of a state rebuilt by recomputing
    `span` positions before `position` (see `cut_forward`), for each span."""
    from plt_port.model import PLTForCausalLM

    model = PLTForCausalLM.from_pretrained(model_dir, "float32")
    full = cut_forward(model, ids, loops, 0)
    return {span: float(np.abs(cut_forward(model, ids, loops, position - span)[position:]
                               - full[position:]).max()) for span in spans}


# ---- timings ----------------------------------------------------------------------------
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def marked_state(backend: Backend, context: int, capacity: int,
                 history: HistoryPolicy | None = None) -> DecodeState:
    """A state of one sequence whose caches hold `context` positions (marked written; its
    tokens unknown)."""
    state = backend.empty_state(1, capacity, history)
    state.lengths[:] = context
    state.active[:] = True
    if history is not None:
        state.history.slots[0] = SlotHistory(tokens=None)
    return state


def median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        prepared = run()  # returns the timed call, its preparation untimed
        start = time.perf_counter()
        prepared()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_rewinds(backend: Backend, context: int, distances: list[int], snapshot_every: int,
                 repeats: int = 5) -> list[dict]:
    """Rows (option, positions, ms, bytes kept) of the ways to rewind a sequence of `context`
    tokens by each distance, and of what the journal costs a decode step."""
    config, loops = backend.config, backend.loops
    itemsize = ITEMSIZE[backend.run_dtype]
    deepest = max(distances)
    capacity = cache_layout.grown_capacity(context + deepest + 1, config.max_position_embeddings)
    journaled = marked_state(backend, context - deepest, capacity, HistoryPolicy(depth=deepest))
    token = np.array([3])
    for _ in range(deepest):
        backend.step(journaled, token)
    rows = []

    def row(option, positions, ms, kept):
        rows.append(dict(option=option, positions=positions, ms=ms, bytes=kept))

    for distance in distances:
        def undo(distance=distance):
            state = backend.slot_state(journaled, 0)
            return lambda: backend.rewind(state, 0, context - distance)

        row("undo journal", distance, median_ms(undo, repeats),
            cache_layout.journal_bytes(config, loops, distance, itemsize))
    snapshot = backend.snapshot(journaled, 0)

    def restore():
        state = backend.slot_state(journaled, 0)
        return lambda: backend.restore_snapshot(state, 0, snapshot)

    row("restore snapshot", min(config.window, context), median_ms(restore, repeats),
        cache_layout.snapshot_bytes(config, loops, context, itemsize))
    for label, tokens in (("prefill from snapshot (mean)", snapshot_every // 2),
                          ("exact recompute (prefill of its span)",
                           min(exact_recompute_span(config, loops), context))):
        def extend(tokens=tokens):
            state = marked_state(backend, context - tokens, capacity)
            return lambda: backend.extend(state, [3] * tokens)

        row(label, tokens, median_ms(extend, max(1, repeats // 2)), 0)
    plain = marked_state(backend, context, capacity)
    recording = marked_state(backend, context, capacity, HistoryPolicy(depth=deepest))
    step_s = {0: [], deepest: []}
    for _ in range(repeats * 4):  # interleaved, so that the machine's load hits both alike
        for depth, state in ((0, plain), (deepest, recording)):
            start = time.perf_counter()
            backend.step(state, token)
            step_s[depth].append(time.perf_counter() - start)
    for depth, times in step_s.items():
        row(f"decode step, journal depth {depth}", 1, statistics.median(times) * 1e3, 0)
    return rows


def format_rewind_table(title: str, rows: list[dict]) -> str:
    lines = [title, f"{'option':<40} {'positions':>9} {'ms':>9} {'bytes kept':>12}"]
    lines += [f"{r['option']:<40} {r['positions']:>9} {r['ms']:>9.3f} {r['bytes']:>12,}"
              for r in rows]
    return "\n".join(lines)


# ---- a chat re-sent each turn ---------------------------------------------------------------
def time_chat_turns(backend: Backend, turns: int, system_tokens: int, user_tokens: int = 30,
                    answer_tokens: int = 16, seed: int = 0) -> list[dict]:
    """Time to first token of each turn of a chat re-sent whole every turn (a system prompt
    of `system_tokens` random ids, then per turn `user_tokens` ids and a greedy answer of
    `answer_tokens`), on an engine with the prompt cache and one without, turn by turn
    interleaved. Rows: turn, prompt tokens, cached tokens, ttft_ms with and without, whether
    both answered alike (fp32: always; bf16 roundings differ between chunkings)."""
    from .benchmark import bench_tokenizer
    from .engine import EngineCore, Request
    from .prompt_cache import PromptCache
    from .sampling import SamplingParams

    rng = np.random.default_rng(seed)
    vocab = backend.config.vocab_size
    tokenizer = bench_tokenizer(getattr(backend, "source_dir", backend.model_dir), vocab)
    cores = {name: EngineCore(lambda _: backend, tokenizer, max_batch=1, prompt_cache=cache).open()
             for name, cache in (("cached", PromptCache()), ("plain", None))}
    history = rng.integers(3, vocab, system_tokens).tolist()
    rows = []
    for turn in range(1, turns + 1):
        history += rng.integers(3, vocab, user_tokens).tolist()
        row, answers = dict(turn=turn, prompt_tokens=len(history)), {}
        for name, core in cores.items():
            answer, stats = [], None
            request = Request(list(history), answer_tokens, emit=None,
                              sampling=SamplingParams(temperature=0))
            for event in core.stream(request):
                answer.append(event.token)
                stats = event.stats
            row[f"{name}_ttft_ms"] = stats.ttft_s * 1e3
            row[f"{name}_cached"] = stats.cached_tokens
            answers[name] = answer
        row["same_answer"] = answers["cached"] == answers["plain"]
        rows.append(row)
        history += answers["cached"]  # what a client of the cached server sends back
    cache = cores["cached"].prompt_cache
    entry = max(cache.entries.values(), key=lambda e: len(e.tokens))
    itemsize = ITEMSIZE[backend.run_dtype]
    spec = cache_layout.cache_bytes(backend.config, backend.loops, 1, entry.state.capacity,
                                    itemsize, backend.kv_quant)
    rows.append(dict(entry_tokens=len(entry.tokens), entry_bytes=entry.nbytes,
                     entry_bytes_per_token=entry.nbytes / len(entry.tokens),
                     spec_bytes_per_token=spec / entry.state.capacity,
                     spec_bytes_at_capacity=spec, capacity=entry.state.capacity))
    return rows


def format_chat_table(title: str, rows: list[dict]) -> str:
    *turns, memory = rows
    lines = [title, f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT cache on ms':>17} "
                    f"{'TTFT cache off ms':>18} {'off/on':>7} {'same answer':>12}"]
    lines += [f"{r['turn']:>4} {r['prompt_tokens']:>7} {r['cached_cached']:>7} "
              f"{r['cached_ttft_ms']:>17.1f} {r['plain_ttft_ms']:>18.1f} "
              f"{r['plain_ttft_ms'] / r['cached_ttft_ms']:>7.1f} {str(r['same_answer']):>12}"
              for r in turns]
    last, second = turns[-1], turns[1] if len(turns) > 1 else turns[0]
    lines.append(f"turn {last['turn']} / turn 2 with the cache: "
                 f"{last['cached_ttft_ms'] / second['cached_ttft_ms']:.2f}x; "
                 f"entry of {memory['entry_tokens']} tokens: {memory['entry_bytes']:,} bytes, "
                 f"{memory['entry_bytes_per_token']:.0f} B/token (SPEC cache_bytes at its "
                 f"capacity {memory['capacity']}: {memory['spec_bytes_per_token']:.0f} B/token)")
    return "\n".join(lines)
