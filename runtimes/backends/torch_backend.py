"""PyTorch backend: the reference blocks (`plt_port.model`) over static caches, with
cross-loop-parallel (CLP) decode. This module only decides where K/V come from.

Caches (`plt_port.cache_layout`), preallocated and written by index (gpt-fast style):

  global_kv  per layer a `torch_kv.GlobalKV`: K, V [B, G, capacity, D], dense or quantized
  ring_kv    per layer K, V [B, G, (L-1)*Wr, D]   Wr = min(W, capacity) slots per loop; loop
             r >= 2 owns slots (r-2)*Wr .. (r-1)*Wr - 1
  clp_carry  [L-1, B, d]

A decode step runs its loop rows as the "tokens" of one block input [B, R, d], all at the
sequence's own position t: CLP passes the L rows at once (each weight read once per step),
naive passes one row at a time. Inside a layer, loop 1's row writes global slot t, then
attends causally over the global cache; rows of loops >= 2 write their ring slot and run
G-SWA over the global cache and their own ring block (a block-diagonal mask over the rings).

On the CPU in fp32 every nn.Linear runs on oneDNN with its weight reordered once at load
(`PackedLinear`; MKL's sgemm, torch's default, is slow at decode's few rows, on AMD CPUs
above all), Q, K, V are one product and so are the MLP's gate and up (`fuse_projections`:
25 products a pass instead of 43 at 6 layers), and decode attention is two matmuls per K/V
group (`grouped_attend`) rather than SDPA's CPU kernel. README "Serving speed vs vLLM" has
what they changed.

Options: dtype ("float32", "bfloat16", "float16"; default: the checkpoint's stored precision,
except float16 on the CPU runs in float32, see `plt_port.model.run_dtype`; logits are always
returned in fp32),
device ("cpu", "cuda"), threads (sets torch's intra-op threads for the whole process),
kv_bits / kv_group_size / quantized_kv_start (the global K/V quantized, mlx-lm's options;
`plt_port.cache_layout.KVQuant`).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plt_port.cache_layout import (grown_capacity, kv_quant_option, ring_slot,
                                   ring_slot_positions, ring_slots)
from plt_port.model import (TORCH_DTYPES, PLTForCausalLM, attend, causal_mask, gate_mix,
                            gated_swa, rope_heads, run_dtype, to_torch)
from plt_port.prompt_cache_file import global_names

from .base import Backend, BackendError
from .torch_kv import GlobalKV


@dataclass
class TorchCaches:
    global_kv: list[GlobalKV]
    ring_kv: list[tuple[torch.Tensor, torch.Tensor]]
    clp_carry: torch.Tensor | None
    rings: int  # L - 1

    @property
    def ring_slots(self) -> int:
        """Slots of each loop's ring (min(window, capacity))."""
        return self.ring_kv[0][0].shape[2] // self.rings if self.ring_kv else 0

    def tensors(self) -> list[torch.Tensor]:
        kv = [t for store in self.global_kv for t in store.tensors()]
        kv += [t for pair in self.ring_kv for t in pair]
        return kv + ([self.clp_carry] if self.clp_carry is not None else [])


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A copy of a tensor as a numpy array (bf16 as `ml_dtypes.bfloat16`)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().copy().view(ml_dtypes.bfloat16)
    return tensor.numpy().copy()


class PackedLinear(nn.Module):
    """Linears stacked along their outputs, held as one weight in oneDNN's own layout
    (reordered once): one product gives every linear's output, one after the other."""

    ROWS_HINT = 16  # the rows oneDNN picks the layout for; any count runs (2..128 as fast)

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        weight = torch.cat([linear.weight.detach() for linear in linears])
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, self.ROWS_HINT)
        biases = [linear.bias for linear in linears]
        self.bias = None if all(b is None for b in biases) else torch.cat([
            torch.zeros(linear.out_features) if b is None else b.detach()
            for linear, b in zip(linears, biases)])
        self.sizes = [linear.out_features for linear in linears]

    def forward(self, x: torch.Tensor):
        """The output [..., out] of one linear; of several, one tensor per linear."""
        y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return y if len(self.sizes) == 1 else y.split(self.sizes, dim=-1)


class FusedProjections(nn.Module):
    """A layer's attention projections with Q, K and V as one PackedLinear (the layer reads
    `project`, `o_proj` and `plt_gate`)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.qkv_proj = PackedLinear(attention.q_proj, attention.k_proj, attention.v_proj)
        self.o_proj = PackedLinear(attention.o_proj)
        self.head_dim = attention.head_dim
        if hasattr(attention, "plt_gate"):
            self.plt_gate = attention.plt_gate

    def project(self, x, cos, sin):
        return rope_heads(*self.qkv_proj(x), self.head_dim, cos, sin)


class FusedMLP(nn.Module):
    """SwiGLU with gate and up as one PackedLinear."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_up_proj = PackedLinear(mlp.gate_proj, mlp.up_proj)
        self.down_proj = PackedLinear(mlp.down_proj)

    def forward(self, x):
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def grouped_attend(q, k, v, mask):
    """Softmax attention of q [B, H, R, D] over k, v [B, G, S, D] (mask bool [B, 1, R, S] or
    None) as matmuls: the H / G heads of a K/V group and their R rows are the rows of one
    product. A row that sees no key gets the mean of v (SDPA: zeros); only free slots have
    such rows."""
    B, H, R, D = q.shape
    G, S = k.shape[1], k.shape[2]
    scores = (q.reshape(B, G, H // G * R, D) @ k.transpose(-1, -2)) * D ** -0.5
    if mask is not None:
        scores = scores.view(B, G, H // G, R, S).masked_fill(
            ~mask[:, :, None], torch.finfo(scores.dtype).min).view(B, G, H // G * R, S)
    return (torch.softmax(scores, dim=-1) @ v).view(B, H, R, D)


def fuse_projections(model: PLTForCausalLM) -> None:
    """Every nn.Linear of `model` on oneDNN (the dense weights freed): each layer's Q, K, V
    as one product, its MLP's gate and up as one, the LM head packed."""
    for layer in model.model.layers:
        layer.self_attn = FusedProjections(layer.self_attn)
        layer.mlp = FusedMLP(layer.mlp)
    if not model.config.tie_word_embeddings:
        model.lm_head = PackedLinear(model.lm_head)


@dataclass
class StepRows:
    """What every pass of one decode step shares (all its rows sit at their sequence's
    position t): computed once per step, not once per loop pass."""

    t: torch.Tensor                 # [B] positions
    cos: torch.Tensor               # [B, 1, D] RoPE at t, broadcast over the rows
    sin: torch.Tensor
    kv_len: int                     # global slots read: 0..max(t)
    global_mask: torch.Tensor | None  # [B, 1, 1, kv_len]; None: one length in the batch
    batch_index: torch.Tensor       # [B]


def per_loop(ring: torch.Tensor, rings: int) -> torch.Tensor:
    """A ring tensor [B, G, R*Wr, D] viewed as [B, G, R, Wr, D]."""
    return ring.unflatten(2, (rings, -1))


class TorchBackend(Backend):
    name = "torch"
    supports_rewind = True
    supports_verify = True

    def __init__(self, model_dir: str, loops: int | None = None, dtype: str | None = None,
                 device: str = "cpu", threads: int | None = None, kv_bits: int | None = None,
                 kv_group_size: int | None = None, quantized_kv_start: int = 0):
        super().__init__(model_dir, loops)
        self.kv_quant = kv_quant_option(kv_bits, kv_group_size, quantized_kv_start,
                                        self.config.head_dim, BackendError)
        if dtype is not None and dtype not in TORCH_DTYPES:
            raise BackendError(f"torch backend: dtype must be one of {list(TORCH_DTYPES)}, "
                               f"got {dtype!r}")
        if device not in ("cpu", "cuda"):
            raise BackendError(f"torch backend: device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: device 'cuda' asked for, but this torch build "
                               "sees no CUDA device")
        if self.check_threads(threads):
            torch.set_num_threads(threads)
        self.run_dtype = dtype or run_dtype(self.config.torch_dtype, device)
        self.dtype = TORCH_DTYPES[self.run_dtype]
        self.device = torch.device(device)
        self.model = PLTForCausalLM.from_pretrained(self.model_dir, self.run_dtype,
                                                    self.config).to(self.device)
        self.decode_attend = lambda q, k, v, mask: attend(q, k, v, mask)[0]
        if self.device.type == "cpu" and self.dtype == torch.float32 \
                and torch.backends.mkldnn.is_available():
            fuse_projections(self.model)
            self.decode_attend = grouped_attend
        self.window = self.config.window
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [P, D]

    def peak_memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return None

    # ---- caches ------------------------------------------------------------------------
    def new_caches(self, batch: int, capacity: int) -> TorchCaches:
        cfg = self.config
        G, D = cfg.num_key_value_heads, cfg.head_dim

        def zeros(*shape):
            return torch.zeros(*shape, dtype=self.dtype, device=self.device)

        kv_quant = self.kv_quant if self.quantize_kv_from_the_start() else None
        ring_width = (self.loops - 1) * ring_slots(self.window, capacity)
        return TorchCaches(
            global_kv=[GlobalKV.zeros(batch, G, capacity, D, self.dtype, self.device, kv_quant)
                       for _ in range(cfg.num_hidden_layers)],
            ring_kv=[(zeros(batch, G, ring_width, D), zeros(batch, G, ring_width, D))
                     for _ in range(cfg.num_hidden_layers)] if self.loops > 1 else [],
            clp_carry=zeros(self.loops - 1, batch, cfg.hidden_size) if self.supports_clp else None,
            rings=self.loops - 1,
        )

    def grow_caches(self, caches: TorchCaches, capacity: int) -> TorchCaches:
        caches.global_kv = [store.grown(capacity) for store in caches.global_kv]
        slots = ring_slots(self.window, capacity)
        if caches.ring_kv and slots > caches.ring_slots:  # new slots at the end of each ring
            def grown(ring):
                rings = per_loop(ring, caches.rings)
                out = rings.new_zeros(*rings.shape[:3], slots, rings.shape[4])
                out[:, :, :, :rings.shape[3]] = rings
                return out.flatten(2, 3)

            caches.ring_kv = [(grown(k), grown(v)) for k, v in caches.ring_kv]
        return caches

    def copy_slot(self, caches, slot, source_caches, source_slot, length):
        for store, source_store in zip(caches.global_kv, source_caches.global_kv):
            store.copy_slot(slot, source_store, source_slot, length)
        # rings of different sizes: a smaller one holds positions < its size in its prefix
        shared = min(caches.ring_slots, source_caches.ring_slots)
        for ring, source_ring in zip((t for pair in caches.ring_kv for t in pair),
                                     (t for pair in source_caches.ring_kv for t in pair)):
            rings = per_loop(ring, caches.rings)
            rings[slot] = 0
            rings[slot, :, :, :shared] = per_loop(source_ring, caches.rings)[source_slot, :, :,
                                                                              :shared]
        if caches.clp_carry is not None:
            caches.clp_carry[:, slot] = source_caches.clp_carry[:, source_slot]
        return caches

    def cache_nbytes(self, caches: TorchCaches) -> int:
        return sum(t.numel() * t.element_size() for t in caches.tensors())

    def global_quantized(self, caches: TorchCaches) -> bool:
        return caches.global_kv[0].quantized

    def quantize_global(self, caches: TorchCaches) -> TorchCaches:
        caches.global_kv = [store.to_quantized(self.kv_quant) for store in caches.global_kv]
        return caches

    # ---- rewinds ------------------------------------------------------------------------
    def _ring_index(self, caches: TorchCaches, ring_slots: np.ndarray) -> torch.Tensor:
        """Columns of the [B, G, R*Wr, D] ring tensors of ring slots [..., m] in every loop:
        [..., R*m], loop by loop."""
        loops = np.arange(caches.rings)[:, None] * caches.ring_slots
        index = loops + ring_slots[..., None, :]
        return torch.from_numpy(index.reshape(*ring_slots.shape[:-1], -1)).to(self.device)

    def gather_ring(self, caches, slots, ring_slots):
        if not caches.ring_kv:
            return None
        batch = torch.from_numpy(slots).to(self.device)[:, None]
        index = self._ring_index(caches, ring_slots)  # [k, R*m]
        return [ring[batch, :, index] for pair in caches.ring_kv for ring in pair]  # [k, R*m, G, D]

    def scatter_ring(self, caches, slot, ring_slots, rows, row, columns):
        width = rows[0].shape[1] // caches.rings  # m of the gather
        index = self._ring_index(caches, ring_slots)
        source = torch.from_numpy((np.arange(caches.rings)[:, None] * width
                                   + columns[None]).reshape(-1)).to(self.device)
        for ring, saved in zip((t for pair in caches.ring_kv for t in pair), rows):
            ring[slot][:, index] = saved[row][source].transpose(0, 1)
        return caches

    def gather_carry(self, caches, slots):
        if caches.clp_carry is None:
            return None
        index = torch.from_numpy(slots).to(self.device)
        return [caches.clp_carry[:, index].transpose(0, 1)[:, :, None]]  # [k, L-1, 1, d], a copy

    def scatter_carry(self, caches, slot, carries, row, column):
        caches.clp_carry[:, slot] = 0 if carries is None else carries[0][row, :, column]
        return caches

    def own_rows(self, arrays, row):
        return [a[row:row + 1].clone() for a in arrays]

    # ---- saved prompt caches ---------------------------------------------------------------
    def export_slot(self, caches, slot, length):
        arrays, held = {}, min(self.window, length)
        for i, store in enumerate(caches.global_kv):
            for kv, parts in (("key", store.keys), ("value", store.values)):
                for name, part in zip(global_names(i, kv, store.quantized), parts):
                    arrays[name] = to_numpy(part[slot, :, :length])
        for i, pair in enumerate(caches.ring_kv):
            for kv, ring in zip(("key", "value"), pair):  # [G, R, Wr, D] -> [R, G, Wn, D]
                arrays[f"ring.{i}.{kv}"] = to_numpy(
                    per_loop(ring, caches.rings)[slot, :, :, :held].transpose(0, 1))
        if caches.clp_carry is not None:
            arrays["carry"] = to_numpy(caches.clp_carry[:, slot])
        return arrays

    def import_slot(self, caches, slot, arrays):
        def tensor(name):
            return to_torch(arrays[name]).to(self.device)

        for i, store in enumerate(caches.global_kv):
            for kv, parts in (("key", store.keys), ("value", store.values)):
                for name, part in zip(global_names(i, kv, store.quantized), parts):
                    value = tensor(name)
                    part[slot, :, :value.shape[1]] = value
        for i, pair in enumerate(caches.ring_kv):
            for kv, ring in zip(("key", "value"), pair):
                value = tensor(f"ring.{i}.{kv}").transpose(0, 1)
                per_loop(ring, caches.rings)[slot, :, :, :value.shape[2]] = value
        if caches.clp_carry is not None:
            caches.clp_carry[:, slot] = tensor("carry")
        return caches

    def _logits(self, h_last: torch.Tensor) -> np.ndarray:
        return self.model.lm_logits(h_last).float().cpu().numpy()

    def _ring_positions(self, last: torch.Tensor, slots: int) -> torch.Tensor:
        return ring_slot_positions(last, torch.arange(slots, device=self.device), self.window)

    # ---- prefill -----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_chunk(self, caches, ids, start, num_new, trace=False, every_row=False):
        model, cfg, W = self.model, self.config, self.window
        ids = torch.from_numpy(ids).to(self.device)
        T = ids.shape[1]
        end = start + T
        ends = torch.from_numpy(start + num_new).to(self.device)
        last = torch.from_numpy(self.last_token_index(num_new)).to(self.device)
        has_tokens = ends > start
        batch_index = torch.arange(ids.shape[0], device=self.device)
        positions = torch.arange(start, end, device=self.device)
        cos, sin = model.rope(positions)
        global_mask = causal_mask(positions, torch.arange(end, device=self.device))
        # Loop r >= 2 keys: its ring (positions before the chunk, the same for every sequence
        # still inside its prompt), then the chunk's own K/V.
        Wr = caches.ring_slots
        ring_pos = self._ring_positions(torch.tensor([start - 1], device=self.device), Wr)[0]
        local_pos = torch.cat([ring_pos, positions])
        local_mask = causal_mask(positions, local_pos, W) & (local_pos >= 0)
        embeddings = model.model.embed_tokens(ids)

        def attention_for(loop: int, i: int):
            global_kv = caches.global_kv[i]

            def attention(q, k, v, x_res):
                if loop == 1:
                    global_kv.write((slice(None), slice(None), slice(start, end)), k, v)
                    return attend(q, *global_kv.read(end), global_mask)[0]
                ring = slice((loop - 2) * Wr, (loop - 1) * Wr)
                ring_k, ring_v = caches.ring_kv[i][0][:, :, ring], caches.ring_kv[i][1][:, :, ring]
                local_kv = (torch.cat([ring_k, k], dim=2), torch.cat([ring_v, v], dim=2))
                y, _ = gated_swa(q, global_kv.read(end), global_mask,
                                 local_kv, local_mask, model.gate(i)(x_res, q))
                self._write_ring_chunk(ring_k, k, start, ends)
                self._write_ring_chunk(ring_v, v, start, ends)
                return y

            return attention

        h = embeddings
        carries = []  # loop r's shifted input: the carry before each chunk position
        for loop in range(1, self.loops + 1):
            for i, layer in enumerate(model.model.layers):
                h = layer(h, cos, sin, attention_for(loop, i))
            if loop < self.loops and not cfg.is_v1:
                carry = model.loop_carry(h)
                previous = caches.clp_carry[loop - 1]
                shifted = torch.cat([previous[:, None], carry[:, :-1]], dim=1)
                previous.copy_(torch.where(has_tokens[:, None], carry[batch_index, last], previous))
                h = model.next_loop_input(embeddings, shifted)
                carries.append(shifted)
        logits = self._logits(h if every_row else h[batch_index, last])
        return (logits, [torch.stack(carries, dim=1)] if carries else None) if trace else logits

    def _write_ring_chunk(self, ring, chunk_kv, start: int, ends):
        """Write each sequence's last real chunk positions (those < ends[b]) into its ring
        (a [B, G, Wr, D] view), each in its slot; padding positions are never written."""
        B, G, T, D = chunk_kv.shape
        slots = ring.shape[2]
        slot_pos = self._ring_positions(ends - 1, slots)  # [B, Wr]
        written = slot_pos >= start
        index = (slot_pos - start).clamp(0, T - 1)
        new = chunk_kv.gather(2, index[:, None, :, None].expand(B, G, slots, D))
        ring.copy_(torch.where(written[:, None, :, None], new, ring))

    # ---- decode ------------------------------------------------------------------------
    def _rope_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos, sin [B, D] at positions t [B], from a table of the positions so far
        (grown as the caches grow): the same values `model.rope` computes."""
        needed = int(t.max()) + 1
        if self.rope_table is None or self.rope_table[0].shape[0] < needed:
            size = grown_capacity(needed, self.config.max_position_embeddings)
            self.rope_table = self.model.rope(torch.arange(size, device=self.device))
        return self.rope_table[0][t], self.rope_table[1][t]

    def _step_rows(self, positions: np.ndarray) -> StepRows:
        t = torch.from_numpy(positions).to(self.device)
        cos, sin = self._rope_at(t)
        kv_len = int(positions.max()) + 1
        # every row of a step attends to the same global slots 0..t: with one length in the
        # batch that is the whole slice, and attention runs without a mask
        global_mask = None if (positions == positions[0]).all() else \
            causal_mask(t[:, None], torch.arange(kv_len, device=self.device))[:, None]
        return StepRows(t, cos[:, None], sin[:, None], kv_len, global_mask,
                        torch.arange(len(positions), device=self.device))

    @torch.inference_mode()
    def decode_rows(self, caches, tokens, positions, mode):
        model = self.model
        step = self._step_rows(positions)
        embeddings = model.model.embed_tokens(torch.from_numpy(tokens).to(self.device))[:, None]
        if self.config.is_v1:  # loop r's input is loop r-1's output: sequential by nature
            h = embeddings
            for loop in range(1, self.loops + 1):
                h = self._run_rows(caches, h, loop, step)
            return self._logits(h[:, -1])
        x = embeddings
        if self.loops > 1:
            later = model.next_loop_input(embeddings, caches.clp_carry.transpose(0, 1))
            x = torch.cat([x, later], dim=1)  # [B, L, d]: the L rows of this step
        if mode == "clp":
            h = self._run_rows(caches, x, 1, step)
        else:
            h = torch.cat([self._run_rows(caches, x[:, r:r + 1], r + 1, step)
                           for r in range(self.loops)], dim=1)
        if self.loops > 1:
            caches.clp_carry.copy_(model.loop_carry(h[:, :-1]).transpose(0, 1))
        return self._logits(h[:, -1])

    def _run_rows(self, caches: TorchCaches, x, first_loop: int, step: StepRows):
        """One pass of the stack over rows x [B, R, d] = loops first_loop.. at positions t [B]."""
        model, W, Wr = self.model, self.window, caches.ring_slots
        B, R, _ = x.shape
        t, kv_len, global_mask, batch_index = step.t, step.kv_len, step.global_mask, \
            step.batch_index
        plain_rows = 1 if first_loop == 1 else 0  # loop 1's row: causal attention only
        ring_loops = torch.arange(first_loop + plain_rows, first_loop + R, device=self.device)
        if len(ring_loops):
            ring = slice(int(ring_loops[0] - 2) * Wr, int(ring_loops[-1] - 1) * Wr)
            key_loop = ring_loops[0] + torch.arange(len(ring_loops) * Wr, device=self.device) // Wr
            filled = (self._ring_positions(t, Wr) >= 0).repeat(1, len(ring_loops))  # [B, rows*Wr]
            local_mask = ((ring_loops[:, None] == key_loop[None])[None] & filled[:, None])[:, None]
            write_slots = (ring_loops - 2)[None] * Wr + ring_slot(t, W)[:, None]  # [B, rows]

        def attention_for(i: int):
            global_kv = caches.global_kv[i]

            def attention(q, k, v, x_res):
                if plain_rows:  # loop 1 writes slot t before any row reads the global cache
                    global_kv.write((batch_index, slice(None), t), k[:, :, 0], v[:, :, 0])
                # one call for every row's global branch (loop 1's row uses only that)
                y = self.decode_attend(q, *global_kv.read(kv_len), global_mask)
                if not len(ring_loops):
                    return y
                rows = slice(plain_rows, R)
                ring_k, ring_v = caches.ring_kv[i]
                ring_k[batch_index[:, None], :, write_slots] = k[:, :, rows].transpose(1, 2)
                ring_v[batch_index[:, None], :, write_slots] = v[:, :, rows].transpose(1, 2)
                y_local = self.decode_attend(q[:, :, rows], ring_k[:, :, ring],
                                             ring_v[:, :, ring], local_mask)
                gate = model.gate(i)(x_res[:, rows], q[:, :, rows])
                return torch.cat([y[:, :, :plain_rows], gate_mix(y[:, :, rows], y_local, gate)],
                                 dim=2)

            return attention

        for i, layer in enumerate(model.model.layers):
            x = layer(x, step.cos, step.sin, attention_for(i))
        return x
