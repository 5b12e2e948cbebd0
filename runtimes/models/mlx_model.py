"""Parallel Loop Transformer in MLX, in the anatomy of an mlx-lm model file.

ModelArgs (config.json), blocks with HF parameter names, `Model` with `sanitize` and
`make_cache`. The math is SPEC sections 2-4 (the PyTorch reference is plt_port/model.py):
one stack of Llama blocks run L times; loop 1 writes the global (shared) K/V, loops >= 2
run gated sliding-window attention over loop 1's K/V and their own windowed K/V.

Batches are right-padded: sequence b keeps token p at position p and cache slot p, and
`ends`/`positions` (host numpy) say where its real tokens end.

- `prefill` runs one chunk loop by loop (loop r needs loop r-1's shifted outputs of the
  same chunk) with `mx.fast.scaled_dot_product_attention` and masks;
- `step(mode="clp")` runs the L rows of one new token through the stack in one pass
  (SPEC section 4): row 1 writes its K/V to the global cache before rows >= 2 read it;
- `step(mode="naive")` runs the same rows as L sequential passes (v1 checkpoints: loop r's
  input is loop r-1's output at the same position, so this is their only mode).
The G-SWA of decode rows >= 2 goes through `metal_kernels.gswa.gswa_decode` (its layouts
are the cache layouts here); a Metal kernel may back it.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from metal_kernels.gswa import gswa_decode, quantized_attention
from plt_port.cache_layout import grown_capacity, ring_slot, ring_slot_positions, ring_slots
from plt_port.config import PLTConfig, canonical_name


class ModelArgs(PLTConfig):
    """config.json: the PLTConfig fields and derived views (MLX entries such as
    `quantization` are kept in `extra`)."""


class PLTGate(nn.Module):
    """g = sigmoid(gate_logit) [B, H, T]: hidden form W_g RMSNorm_g(x_res) + b, or query form
    <q_h, w_h> + b_h. Plain arrays, not nn.Linear: quantization leaves these tiny tensors alone."""

    def __init__(self, args: ModelArgs, hidden_form: bool):
        super().__init__()
        H = args.num_attention_heads
        self.hidden_form = hidden_form
        self.weight = mx.zeros((H, args.hidden_size if hidden_form else args.head_dim))
        self.bias = mx.zeros((H,))
        if hidden_form:
            self.gate_norm = nn.RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x_res: mx.array, q: mx.array) -> mx.array:
        if self.hidden_form:
            logit = (self.gate_norm(x_res) @ self.weight.T + self.bias).transpose(0, 2, 1)
        else:
            logit = (q * self.weight[:, None, :]).sum(-1) + self.bias[:, None]
        return mx.sigmoid(logit)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, H, G, D = (args.hidden_size, args.num_attention_heads, args.num_key_value_heads,
                      args.head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, D
        self.rope_theta = args.rope_theta
        self.scale = D ** -0.5
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, G * D, bias=False)
        self.v_proj = nn.Linear(d, G * D, bias=False)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        if not args.is_v1:
            self.plt_gate = PLTGate(args, args.gate_uses_hidden)

    def rope(self, x: mx.array, offset) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0,
                            offset=offset)

    def project(self, x: mx.array, offset, rows_at_one_position: bool = False):
        """x [B, T, d] -> post-RoPE q [B, H, T, D], k and v [B, G, T, D].

        Positions are offset + 0..T-1; with `rows_at_one_position` (decode rows of one token)
        every row sits at position offset[b].
        """
        B, T, _ = x.shape
        H, G, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, H, D)
        k = self.k_proj(x).reshape(B, T, G, D)
        v = self.v_proj(x).reshape(B, T, G, D).transpose(0, 2, 1, 3)
        if rows_at_one_position:  # rope's position axis is the second-to-last: make it length 1
            q = self.rope(q.reshape(B, T * H, 1, D), offset).reshape(B, T, H, D)
            k = self.rope(k.reshape(B, T * G, 1, D), offset).reshape(B, T, G, D)
            return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v
        return self.rope(q.transpose(0, 2, 1, 3), offset), self.rope(k.transpose(0, 2, 1, 3), offset), v


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, h, offset, attention, rows_at_one_position=False):
        """One block; `attention(q, k, v, x_res) -> y [B, H, T, D]` decides where K/V go."""
        q, k, v = self.self_attn.project(self.input_layernorm(h), offset, rows_at_one_position)
        y = attention(q, k, v, h)
        B, H, T, D = y.shape
        h = h + self.self_attn.o_proj(y.transpose(0, 2, 1, 3).reshape(B, T, H * D))
        return h + self.mlp(self.post_attention_layernorm(h))


class PLTModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, args.rms_norm_eps)
        if args.is_v1:
            self.gate_projections = [PLTGate(args, hidden_form=False)
                                     for _ in range(args.num_hidden_layers)]


def kv_parts(kv) -> list[mx.array]:
    """The arrays of a global K or V: [values], or [packed, scales, biases] when quantized."""
    return list(kv) if isinstance(kv, tuple) else [kv]


def kv_map(fn, kv, *others):
    """fn applied to each part of `kv` (and the matching parts of `others`), same structure."""
    parts = [fn(*p) for p in zip(kv_parts(kv), *map(kv_parts, others))]
    return tuple(parts) if isinstance(kv, tuple) else parts[0]


def encode_kv(x: mx.array, kv_quant):
    """x [..., D] as a global cache stores it: itself, or mlx-lm's (packed, scales, biases)."""
    if kv_quant is None:
        return x
    return tuple(mx.quantize(x, group_size=kv_quant.group_size, bits=kv_quant.bits))


def quantized_zeros(shape, dtype, kv_quant):
    """The quantized form of zeros of `shape` [..., D] (it dequantizes to zeros)."""
    *outer, D = shape
    return (mx.zeros((*outer, D * kv_quant.bits // 32), mx.uint32),
            mx.zeros((*outer, D // kv_quant.group_size), dtype),
            mx.zeros((*outer, D // kv_quant.group_size), dtype))


class PLTCache:
    """The decode state of one batch (SPEC section 4, layouts of metal_kernels.gswa):

    global_k/v[l]  [B, G, S_cap, D]  loop-1 K/V, position p in slot p; with `kv_quant`, mlx-lm's
                                     QuantizedKVCache layout: a (packed uint32, scales, biases)
                                     triple of mx.quantize along D
    ring_k/v[l]    [R, B, G, Wr, D]  loop r+2's own K/V, position p in slot p % window; Wr =
                                     min(window, S_cap)
    carry          [R, B, d]         n(h^(r+1)) of the last processed position (PLT only)
    with R = loops - 1 and window = keys incl. the query. `state` holds only arrays (a tree
    `mx.compile` takes and returns); loops, ring slots and capacity are read off the shapes.
    """

    def __init__(self, state: dict, kv_quant=None):
        self.state = state
        self.kv_quant = kv_quant  # a plt_port.cache_layout.KVQuant, or None: dense global K/V

    @classmethod
    def zeros(cls, args: ModelArgs, loops: int, batch: int, capacity: int, dtype,
              kv_quant=None) -> "PLTCache":
        G, D, R = args.num_key_value_heads, args.head_dim, loops - 1
        Wr = ring_slots(args.window, capacity)
        n = args.num_hidden_layers
        shape = (batch, G, capacity, D)

        def global_zeros():
            return quantized_zeros(shape, dtype, kv_quant) if kv_quant else mx.zeros(shape, dtype)

        state = {"global_k": [global_zeros() for _ in range(n)],
                 "global_v": [global_zeros() for _ in range(n)]}
        if R:
            state["ring_k"] = [mx.zeros((R, batch, G, Wr, D), dtype) for _ in range(n)]
            state["ring_v"] = [mx.zeros((R, batch, G, Wr, D), dtype) for _ in range(n)]
            if not args.is_v1:
                state["carry"] = mx.zeros((R, batch, args.hidden_size), dtype)
        return cls(state, kv_quant)

    global_k = property(lambda self: self.state["global_k"])
    global_v = property(lambda self: self.state["global_v"])
    ring_k = property(lambda self: self.state.get("ring_k", []))
    ring_v = property(lambda self: self.state.get("ring_v", []))

    @property
    def carry(self) -> mx.array | None:
        return self.state.get("carry")

    @carry.setter
    def carry(self, value: mx.array) -> None:
        self.state["carry"] = value

    @property
    def loops(self) -> int:
        return self.ring_k[0].shape[0] + 1 if self.ring_k else 1

    @property
    def ring_slots(self) -> int | None:
        return self.ring_k[0].shape[3] if self.ring_k else None

    @property
    def capacity(self) -> int:
        return kv_parts(self.global_k[0])[0].shape[2]

    def grow(self, capacity: int, window: int) -> None:
        """Make the global K/V hold `capacity` positions per sequence and the rings
        min(window, capacity) slots, new slots appended (never shrinks)."""
        def padded(array, axis, size):
            extra = list(array.shape)
            extra[axis] = size - array.shape[axis]
            return mx.concatenate([array, mx.zeros(extra, array.dtype)], axis=axis)

        if capacity > self.capacity:
            for name in ("global_k", "global_v"):
                self.state[name] = [kv_map(lambda part: padded(part, 2, capacity), kv)
                                    for kv in self.state[name]]
        slots = ring_slots(window, capacity)
        if self.ring_k and slots > self.ring_slots:
            for name in ("ring_k", "ring_v"):
                self.state[name] = [padded(ring, 3, slots) for ring in self.state[name]]

    def quantize_global(self, kv_quant) -> None:
        """Hold the global K/V quantized from now on (mlx-lm's KVCache.to_quantized)."""
        for name in ("global_k", "global_v"):
            self.state[name] = [encode_kv(kv, kv_quant) for kv in self.state[name]]
        self.kv_quant = kv_quant

    def arrays(self) -> list[mx.array]:
        return [part for value in self.state.values()
                for a in (value if isinstance(value, list) else [value]) for part in kv_parts(a)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


class PromptCache:
    """A PLTCache in mlx-lm's cache protocol: `offset` tokens seen, `state` the arrays
    generate_step evaluates; the PLTCache is allocated by the first call and grows after."""

    def __init__(self):
        self.offset = 0
        self.cache: PLTCache | None = None

    @property
    def state(self) -> list[mx.array]:
        return self.cache.arrays() if self.cache is not None else []


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.use_gswa_kernel: bool | None = None  # None: the Metal kernel iff Metal is available
        self.compile_step = True
        # plain attribute, not a child of the parameter tree (nn.Module files dicts as children)
        object.__setattr__(self, "_compiled_steps", {})
        self.model = PLTModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    # ---- the pieces of SPEC section 2 ------------------------------------------------------
    def gate(self, layer_idx: int) -> PLTGate:
        if self.args.is_v1:
            return self.model.gate_projections[layer_idx]
        return self.model.layers[layer_idx].self_attn.plt_gate

    def lm_logits(self, h: mx.array) -> mx.array:
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def loop_carry(self, h: mx.array) -> mx.array:
        """n(h): what a loop's output contributes to the next loop's (shifted) input."""
        return self.model.norm(h) if self.args.plt_normalize_per_loop else h

    def next_loop_input(self, embeddings: mx.array, shifted_carry: mx.array) -> mx.array:
        return self.args.emb_scale * embeddings + self.args.hidden_scale * shifted_carry

    @property
    def layers(self):
        return self.model.layers

    def sanitize(self, weights: dict) -> dict:
        weights = {canonical_name(k): v for k, v in weights.items()
                   if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    def allocate_cache(self, batch: int, capacity: int, loops: int | None = None,
                       kv_quant=None) -> PLTCache:
        loops = self.args.resolve_loops(loops)
        return PLTCache.zeros(self.args, loops, batch, capacity, self.model.norm.weight.dtype,
                              kv_quant)

    def make_cache(self) -> list[PromptCache]:
        """mlx-lm's cache protocol (`make_prompt_cache`): one entry, filled by __call__."""
        return [PromptCache()]

    # ---- mlx-lm's Model.__call__ ---------------------------------------------------------
    def __call__(self, inputs: mx.array, cache: list[PromptCache] | None = None,
                 loops: int | None = None) -> mx.array:
        """Logits [B, T, V] of loop L at every position of `inputs` [B, T]: a full forward,
        or with `cache` (from make_cache) the next T tokens of the cached sequences, as
        mlx-lm's generate_step feeds them (a prompt chunk, then one token per step)."""
        B, T = inputs.shape
        if cache is None:
            return self.lm_logits(self.prefill(inputs, self.allocate_cache(B, T, loops), 0,
                                               np.full(B, T)))
        (entry,) = cache
        start = entry.offset
        if start + T > self.args.max_position_embeddings:
            raise ValueError(f"{start + T} positions are more than the model's "
                             f"max_position_embeddings={self.args.max_position_embeddings}")
        capacity = grown_capacity(start + T, self.args.max_position_embeddings)
        if entry.cache is None:
            entry.cache = self.allocate_cache(B, capacity, loops)
        entry.cache.grow(capacity, self.args.window)
        if T == 1 and start > 0:
            logits = self.step(inputs[:, 0], entry.cache, np.full(B, start))[:, None]
        else:
            logits = self.lm_logits(self.prefill(inputs, entry.cache, start,
                                                 np.full(B, start + T)))
        entry.offset += T
        return logits

    # ---- prefill ---------------------------------------------------------------------------
    def prefill(self, tokens: mx.array, cache: PLTCache, start: int, ends: np.ndarray,
                carries: list | None = None) -> mx.array:
        """Run a chunk `tokens` [B, C] at positions start..start+C-1 through every loop, writing
        the caches; sequence b's real tokens end at ends[b] (rows past it are padding and
        leave its ring and carry alone). Returns h^(L) [B, C, d]; `carries` (a list) receives
        each loop r < L's shifted input [B, C, d] (the carry before every chunk position)."""
        C = tokens.shape[1]
        ends = np.clip(np.asarray(ends), start, start + C)
        embeddings = self.model.embed_tokens(tokens)
        last_in_chunk = mx.array(np.maximum(ends - 1 - start, 0))
        has_tokens = mx.array(ends > start)
        ring_update = self._ring_update_plan(cache, start, C, ends) if cache.loops > 1 else None
        local_mask = self._local_mask(cache, start, C) if cache.loops > 1 else None
        h = embeddings
        for r in range(1, cache.loops + 1):
            if r > 1 and not self.args.is_v1:
                carry = self.loop_carry(h)
                shifted = mx.concatenate([cache.carry[r - 2][:, None], carry[:, :-1]], axis=1)
                last = mx.take_along_axis(carry, last_in_chunk[:, None, None], axis=1)[:, 0]
                cache.carry[r - 2] = mx.where(has_tokens[:, None], last, cache.carry[r - 2])
                h = self.next_loop_input(embeddings, shifted)
                if carries is not None:
                    carries.append(shifted)
            for i, layer in enumerate(self.layers):
                attention = partial(self._prefill_attention, i, r, cache, start, local_mask,
                                    ring_update)
                h = layer(h, start, attention)
        return h

    def _prefill_attention(self, i, r, cache, start, local_mask, ring_update, q, k, v, x_res):
        end = start + q.shape[2]
        sdpa = partial(mx.fast.scaled_dot_product_attention, scale=self.layers[i].self_attn.scale)
        if r == 1:
            for kv, new in ((cache.global_k[i], k), (cache.global_v[i], v)):
                for part, new_part in zip(kv_parts(kv), kv_parts(encode_kv(new, cache.kv_quant))):
                    part[:, :, start:end] = new_part
        y_glob = self._global_attention(cache, i, q, end, "causal")
        if r == 1:
            return y_glob
        ring_k, ring_v = cache.ring_k[i][r - 2], cache.ring_v[i][r - 2]
        keys, values = (k, v) if start == 0 else (mx.concatenate([ring_k, k], axis=2),
                                                  mx.concatenate([ring_v, v], axis=2))
        y_loc = sdpa(q, keys, values, mask=local_mask)
        take, index = ring_update
        cache.ring_k[i][r - 2] = mx.where(take, mx.take_along_axis(k, index, axis=2), ring_k)
        cache.ring_v[i][r - 2] = mx.where(take, mx.take_along_axis(v, index, axis=2), ring_v)
        g = self.gate(i)(x_res, q)[..., None]
        return g * y_glob + (1 - g) * y_loc

    def _global_attention(self, cache: PLTCache, i: int, q: mx.array, end: int, mask):
        """Attention of q over global slots 0..end-1 of layer i: mx.fast's SDPA, or mlx-lm's
        quantized attention over a quantized cache."""
        scale = self.layers[i].self_attn.scale
        keys, values = (kv_map(lambda part: part[:, :, :end], kv)
                        for kv in (cache.global_k[i], cache.global_v[i]))
        if cache.kv_quant is not None:
            return quantized_attention(q, keys, values, scale, mask, cache.kv_quant)
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)

    def _local_mask(self, cache: PLTCache, start: int, C: int) -> mx.array:
        """Window mask [C, keys]: keys are the ring (positions before `start`, only if start > 0)
        then the chunk. Valid rows have every position < start, so one mask serves the batch."""
        W = self.args.window
        query_pos = np.arange(start, start + C)
        key_pos = query_pos
        if start > 0:
            held = ring_slot_positions(np.array([start - 1]), np.arange(cache.ring_slots), W)
            key_pos = np.concatenate([held[0], query_pos])
        diff = query_pos[:, None] - key_pos[None, :]
        return mx.array((diff >= 0) & (diff < W) & (key_pos[None, :] >= 0))

    def _ring_update_plan(self, cache: PLTCache, start: int, C: int, ends: np.ndarray):
        """Which ring slots take a K/V of this chunk, and its index: ([B,1,Wr,1] bool, int)."""
        source = ring_slot_positions(ends - 1, np.arange(cache.ring_slots), self.args.window)
        take = source >= start
        index = np.where(take, source - start, 0).clip(0, C - 1)
        return mx.array(take[:, None, :, None]), mx.array(index[:, None, :, None].astype(np.int32))

    # ---- decode ----------------------------------------------------------------------------
    def step(self, tokens: mx.array, cache: PLTCache, positions: np.ndarray,
             mode: str = "clp") -> mx.array:
        """One token per sequence (`tokens` [B] at `positions` [B]); logits [B, V].

        "clp": the L rows [E, a E + b carry[1], ...] in one pass (PLT only). "naive": the
        same rows as L sequential passes (v1: row r's input is row r-1's output). The step is
        `mx.compile`d (traced again only when the cache shapes change) unless
        `compile_step` is False.
        """
        pos = mx.array(positions.astype(np.int32))
        if not self.compile_step:
            return self._step(tokens, cache, pos, mode)
        key = (mode, cache.kv_quant)  # the quantization is part of the traced step
        if key not in self._compiled_steps:
            self._compiled_steps[key] = mx.compile(partial(self._step_state, *key))
        logits, cache.state = self._compiled_steps[key](tokens, pos, cache.state)
        return logits

    def _step_state(self, mode, kv_quant, tokens, pos, state):
        cache = PLTCache({name: list(value) if isinstance(value, list) else value
                          for name, value in state.items()}, kv_quant)  # a copy of the tree
        logits = self._step(tokens, cache, pos, mode)
        return logits, cache.state

    def _step(self, tokens, cache, pos, mode):
        L = cache.loops
        global_valid = (mx.arange(cache.capacity)[None, :] <= pos[:, None])[:, None, None, :]
        embeddings = self.model.embed_tokens(tokens[:, None])  # [B, 1, d]
        run = partial(self._decode_pass, cache=cache, pos=pos, global_valid=global_valid)
        if mode == "clp" and not self.args.is_v1:
            rows = [embeddings] + [self.next_loop_input(embeddings, cache.carry[r][:, None])
                                   for r in range(L - 1)]
            outputs = run(mx.concatenate(rows, axis=1), first_loop=1)
        else:
            outputs, h = [], embeddings
            for r in range(1, L + 1):
                if r > 1 and not self.args.is_v1:
                    h = self.next_loop_input(embeddings, cache.carry[r - 2][:, None])
                h = run(h, first_loop=r)
                outputs.append(h)
            outputs = mx.concatenate(outputs, axis=1)
        if cache.carry is not None:
            cache.carry = self.loop_carry(outputs[:, :-1]).transpose(1, 0, 2)
        return self.lm_logits(outputs[:, -1])

    def _decode_pass(self, h, first_loop, cache, pos, global_valid):
        """Rows of loops first_loop.. (h [B, rows, d], all at position pos[b]) through the stack."""
        for i, layer in enumerate(self.layers):
            attention = partial(self._decode_attention, i, first_loop, cache, pos, global_valid)
            h = layer(h, pos, attention, rows_at_one_position=True)
        return h

    def _decode_attention(self, i, first_loop, cache, pos, global_valid, q, k, v, x_res):
        attn = self.layers[i].self_attn
        outputs = []
        if first_loop == 1:  # row 1 writes slot pos before rows >= 2 read the global cache
            slot = pos[:, None, None, None]

            def put(part, new):
                return mx.put_along_axis(part, slot, new, axis=2)

            for name, new in (("global_k", k), ("global_v", v)):
                kvs = cache.state[name]
                kvs[i] = kv_map(put, kvs[i], encode_kv(new[:, :, :1], cache.kv_quant))
            outputs.append(self._global_attention(cache, i, q[:, :, :1], cache.capacity,
                                                  global_valid))
            q, k, v, x_res = q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], x_res[:, 1:]
        rows = q.shape[2]
        if rows:
            first_ring = max(first_loop, 2) - 2
            ring_k = self._ring_write(cache.ring_k, i, first_ring, k, pos, self.args.window)
            ring_v = self._ring_write(cache.ring_v, i, first_ring, v, pos, self.args.window)
            gate = self.gate(i)(x_res, q)
            outputs.append(gswa_decode(q, cache.global_k[i], cache.global_v[i], ring_k, ring_v,
                                       gate, pos + 1, attn.scale,
                                       use_kernel=self.use_gswa_kernel,
                                       kv_quant=cache.kv_quant))
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)

    @staticmethod
    def _ring_write(rings, i, first_ring, kv, pos, window):
        """Write rows' K/V kv [B, G, R, D] at the ring slot of pos in ring rows first_ring.. of
        layer i; returns those ring rows [R, B, G, Wr, D]."""
        R, ring = kv.shape[2], rings[i]
        slot = ring_slot(pos, window)[None, :, None, None, None]
        new = kv.transpose(2, 0, 1, 3)[:, :, :, None, :]  # [R, B, G, 1, D]
        if R == ring.shape[0]:
            rings[i] = mx.put_along_axis(ring, slot, new, axis=3)
            return rings[i]
        rows = mx.put_along_axis(ring[first_ring:first_ring + R], slot, new, axis=3)
        ring[first_ring:first_ring + R] = rows
        return rows
