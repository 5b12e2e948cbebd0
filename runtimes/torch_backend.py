"""PyTorch backend with static caches and cross-loop-parallel (CLP) decode (SPEC section 4).

The blocks are the reference model's (`plt_port.model`); this module only decides where K/V
come from. Cache layout per layer, preallocated and written by index (gpt-fast style):

  global_kv  K, V [B, G, capacity, D]     loop 1's K/V, position p in slot p
  ring_kv    K, V [B, G, (L-1)*W, D]      loop r >= 2 owns slots (r-2)*W .. (r-1)*W - 1;
                                          position p lives in slot (r-2)*W + p % W
  clp_carry  [L-1, B, d]                  n(h^(r)) of each sequence's last position (PLT)

A decode step runs its loop rows as the "tokens" of one block input [B, R, d], all at the
sequence's own position t: CLP passes the L rows at once (each weight read once per step),
naive passes one row at a time. Inside a layer, loop 1's row writes global slot t before any
row reads the global cache; rows of loops >= 2 write their ring slot and attend to their
own ring block only (a block-diagonal mask over the concatenated rings).

Options: dtype ("float32", "bfloat16", "float16"; logits are always returned in fp32),
device ("cpu", "cuda"), threads (sets torch's intra-op threads for the whole process).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from plt_port.model import PLTForCausalLM, attend, causal_mask, gated_swa

from .base import Backend, BackendError, DecodeState, grown_capacity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TorchCaches:
    global_kv: list[tuple[torch.Tensor, torch.Tensor]]
    ring_kv: list[tuple[torch.Tensor, torch.Tensor]]
    clp_carry: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        kv = [t for pair in self.global_kv + self.ring_kv for t in pair]
        return kv + ([self.clp_carry] if self.clp_carry is not None else [])


def ring_positions(last: torch.Tensor, window: int) -> torch.Tensor:
    """Position held by each ring slot j after positions <= last[b] were written:
    the largest p <= last with p % window == j; negative = slot still empty. [B] -> [B, W]."""
    slots = torch.arange(window, device=last.device)
    return last[:, None] - torch.remainder(last[:, None] - slots, window)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model_dir: str, loops: int | None = None, dtype: str = "float32",
                 device: str = "cpu", threads: int | None = None):
        super().__init__(model_dir, loops)
        if dtype not in DTYPES:
            raise BackendError(f"torch backend: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if device not in ("cpu", "cuda"):
            raise BackendError(f"torch backend: device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: device 'cuda' asked for, but this torch build "
                               "sees no CUDA device")
        if self.check_threads(threads):
            torch.set_num_threads(threads)
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device)
        self.model = PLTForCausalLM.from_pretrained(self.model_dir, self.dtype,
                                                    self.config).to(self.device)
        self.window = self.config.window

    # ---- caches ------------------------------------------------------------------------
    def _new_caches(self, batch: int, capacity: int) -> TorchCaches:
        cfg = self.config
        G, D = cfg.num_key_value_heads, cfg.head_dim

        def zeros(*shape):
            return torch.zeros(*shape, dtype=self.dtype, device=self.device)

        ring_slots = (self.loops - 1) * self.window
        return TorchCaches(
            global_kv=[(zeros(batch, G, capacity, D), zeros(batch, G, capacity, D))
                       for _ in range(cfg.num_hidden_layers)],
            ring_kv=[(zeros(batch, G, ring_slots, D), zeros(batch, G, ring_slots, D))
                     for _ in range(cfg.num_hidden_layers)] if self.loops > 1 else [],
            clp_carry=zeros(self.loops - 1, batch, cfg.hidden_size) if self.supports_clp else None,
        )

    def _ensure_capacity(self, state: DecodeState, needed: int) -> None:
        """Grow the global cache (policy: base.grown_capacity) to hold `needed` positions."""
        if needed <= state.capacity:
            return
        capacity = grown_capacity(needed, self.config.max_position_embeddings)

        def grown(cache):
            out = cache.new_zeros(*cache.shape[:2], capacity, cache.shape[3])
            out[:, :, :state.capacity] = cache
            return out

        caches = state.caches
        caches.global_kv = [(grown(k), grown(v)) for k, v in caches.global_kv]
        state.capacity = capacity

    def cache_bytes(self, state: DecodeState) -> int:
        return sum(t.numel() * t.element_size() for t in state.caches.tensors())

    def peak_memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return None

    # ---- prefill -----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts, max_tokens, chunk_size=None):
        self.check_prompts(prompts, max_tokens, chunk_size)
        batch = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        longest = int(lens.max())
        ids = torch.zeros(batch, longest, dtype=torch.long, device=self.device)  # right-padded
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
        state = DecodeState(lengths=np.zeros(batch, dtype=np.int64), capacity=max_tokens,
                            caches=self._new_caches(batch, max_tokens))
        chunk = chunk_size or longest
        last_hidden = torch.zeros(batch, self.config.hidden_size, dtype=self.dtype,
                                  device=self.device)
        for start in range(0, longest, chunk):
            h = self._prefill_chunk(state.caches, ids[:, start:start + chunk], start, lens)
            last_hidden = self._take_at(h, last_hidden, lens - 1 - start)
        state.lengths = lens.cpu().numpy().astype(np.int64)
        return state, self.model.lm_logits(last_hidden).float().cpu().numpy()

    @staticmethod
    def _take_at(h, previous, index):
        """h[b, index[b]] (h [B, T, d]) where 0 <= index[b] < T, else previous[b]."""
        inside = (index >= 0) & (index < h.shape[1])
        taken = h[torch.arange(h.shape[0], device=h.device), index.clamp(0, h.shape[1] - 1)]
        return torch.where(inside[:, None], taken, previous)

    def _prefill_chunk(self, caches: TorchCaches, ids, start: int, lens):
        """Run one chunk (positions start.. of every sequence) loop by loop; h of loop L."""
        model, cfg, W = self.model, self.config, self.window
        T = ids.shape[1]
        end = start + T
        positions = torch.arange(start, end, device=self.device)
        cos, sin = model.rope(positions)
        global_mask = causal_mask(positions, torch.arange(end, device=self.device))
        # Loop r >= 2 keys: its ring (positions before the chunk, the same for every sequence
        # still inside its prompt), then the chunk's own K/V.
        ring_pos = ring_positions(torch.tensor([start - 1], device=self.device), W)[0]
        local_pos = torch.cat([ring_pos, positions])
        local_mask = causal_mask(positions, local_pos, W) & (local_pos >= 0)
        embeddings = model.model.embed_tokens(ids)

        def attention_for(loop: int, i: int):
            global_k, global_v = caches.global_kv[i]

            def attention(q, k, v, x_res):
                if loop == 1:
                    global_k[:, :, start:end] = k
                    global_v[:, :, start:end] = v
                    return attend(q, global_k[:, :, :end], global_v[:, :, :end], global_mask)[0]
                ring = slice((loop - 2) * W, (loop - 1) * W)
                ring_k, ring_v = caches.ring_kv[i][0][:, :, ring], caches.ring_kv[i][1][:, :, ring]
                local_kv = (torch.cat([ring_k, k], dim=2), torch.cat([ring_v, v], dim=2))
                y, _ = gated_swa(q, (global_k[:, :, :end], global_v[:, :, :end]), global_mask,
                                 local_kv, local_mask, model.gate(i)(x_res, q))
                self._write_ring_chunk(ring_k, k, start, lens)
                self._write_ring_chunk(ring_v, v, start, lens)
                return y

            return attention

        h = embeddings
        for loop in range(1, self.loops + 1):
            for i, layer in enumerate(model.model.layers):
                h = layer(h, cos, sin, attention_for(loop, i))
            if loop < self.loops and not cfg.is_v1:
                carry = model.loop_carry(h)
                previous = caches.clp_carry[loop - 1]
                shifted = torch.cat([previous[:, None], carry[:, :-1]], dim=1)
                # each sequence's last position inside this chunk (none: keep the old carry)
                previous.copy_(self._take_at(carry, previous, lens.clamp(max=end) - 1 - start))
                h = model.next_loop_input(embeddings, shifted)
        return h

    @staticmethod
    def _write_ring_chunk(ring, chunk_kv, start: int, lens):
        """Write each sequence's last W valid chunk positions into its ring (a [B, G, W, D] view);
        padding positions (past a prompt's end) are never written."""
        B, G, T, D = chunk_kv.shape
        W = ring.shape[2]
        ends = lens.clamp(start, start + T)  # one past each sequence's last position in the chunk
        slot_pos = ring_positions(ends - 1, W)  # [B, W]
        written = slot_pos >= start
        index = (slot_pos - start).clamp(0, T - 1)
        new = chunk_kv.gather(2, index[:, None, :, None].expand(B, G, W, D))
        ring.copy_(torch.where(written[:, None, :, None], new, ring))

    # ---- decode ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, state, tokens, mode="clp"):
        mode, tokens = self.check_step(state, tokens, mode)
        self._ensure_capacity(state, int(state.lengths.max()) + 1)
        model, caches = self.model, state.caches
        t = torch.from_numpy(state.lengths).to(self.device)
        embeddings = model.model.embed_tokens(torch.from_numpy(tokens).long().to(self.device))
        if self.config.is_v1:  # loop r's input is loop r-1's output: sequential by nature
            h = embeddings[:, None]
            rows = []
            for loop in range(1, self.loops + 1):
                h = self._run_rows(caches, h, loop, t)
                rows.append(h)
            h = torch.cat(rows, dim=1)
        else:
            x = embeddings[:, None]
            if self.loops > 1:
                later = model.next_loop_input(embeddings[:, None], caches.clp_carry.transpose(0, 1))
                x = torch.cat([x, later], dim=1)  # [B, L, d]: the L rows of this step
            if mode == "clp":
                h = self._run_rows(caches, x, 1, t)
            else:
                h = torch.cat([self._run_rows(caches, x[:, r:r + 1], r + 1, t)
                               for r in range(self.loops)], dim=1)
            if self.loops > 1:
                caches.clp_carry.copy_(model.loop_carry(h[:, :-1]).transpose(0, 1))
        state.lengths = state.lengths + 1
        return model.lm_logits(h[:, -1]).float().cpu().numpy()

    def _run_rows(self, caches: TorchCaches, x, first_loop: int, t):
        """One pass of the stack over rows x [B, R, d] = loops first_loop.. at positions t [B]."""
        model, W = self.model, self.window
        B, R, _ = x.shape
        loops = torch.arange(first_loop, first_loop + R, device=self.device)
        positions = t[:, None].expand(B, R)
        cos, sin = model.rope(positions)
        kv_len = int(t.max()) + 1
        global_mask = causal_mask(positions, torch.arange(kv_len, device=self.device))[:, None]
        batch_index = torch.arange(B, device=self.device)
        local_rows = slice(1 if first_loop == 1 else 0, R)
        num_local = R - local_rows.start
        if num_local:
            lowest = max(first_loop, 2)
            ring = slice((lowest - 2) * W, (first_loop + R - 2) * W)
            key_loop = lowest + torch.arange(num_local * W, device=self.device) // W
            filled = (ring_positions(t, W) >= 0).repeat(1, num_local)  # [B, num_local * W]
            local_mask = ((loops[:, None] == key_loop[None])[None] & filled[:, None])[:, None]
            if first_loop == 1:
                # Loop 1's row has no ring of its own and gate 1 drops its local branch; one
                # visible (always finite) slot keeps that branch finite on every SDPA kernel
                # (a fully masked row may be NaN, and 0 * NaN is NaN).
                local_mask[:, :, 0, 0] = True
            write_slots = (loops[local_rows] - 2)[None] * W + (t % W)[:, None]  # [B, num_local]

        def attention_for(i: int):
            global_k, global_v = caches.global_kv[i]

            def attention(q, k, v, x_res):
                if first_loop == 1:  # loop 1 writes slot t before any row reads the cache
                    global_k[batch_index, :, t] = k[:, :, 0]
                    global_v[batch_index, :, t] = v[:, :, 0]
                global_kv = (global_k[:, :, :kv_len], global_v[:, :, :kv_len])
                if not num_local:
                    return attend(q, *global_kv, global_mask)[0]
                ring_k, ring_v = caches.ring_kv[i]
                ring_k[batch_index[:, None], :, write_slots] = k[:, :, local_rows].transpose(1, 2)
                ring_v[batch_index[:, None], :, write_slots] = v[:, :, local_rows].transpose(1, 2)
                gate = model.gate(i)(x_res[:, local_rows], q[:, :, local_rows])
                if first_loop == 1:
                    # Loop 1's row sees no ring slot (its local branch is zero) and gate 1
                    # selects its plain causal attention exactly.
                    gate = torch.cat([torch.ones_like(gate[:, :, :1]), gate], dim=2)
                ring_kv = (ring_k[:, :, ring], ring_v[:, :, ring])
                y, _ = gated_swa(q, global_kv, global_mask, ring_kv, local_mask, gate)
                return y

            return attention

        for i, layer in enumerate(model.model.layers):
            x = layer(x, cos, sin, attention_for(i))
        return x
