"""PLT as one hand-built ONNX graph (onnx.helper only, no torch), in the manner of the
onnxruntime-genai model builder.

The graph runs the layer stack once over a set of rows: `loops` (one loop number per row
group) times the T tokens of `input_ids`. Every MatMul weight feeds exactly one node, so a
runtime that pre-packs weights (ONNX Runtime on the CPU) holds each once, packed, in one
session that serves every call:
- prefill of a chunk: one call per loop in turn, loops=[r], each call taking the previous
  loop's outputs over the chunk (`past_hidden` <- `present_hidden`); the last call's logits
  (of each sequence's last `logit_rows` positions: 1, or the chunk for a speculative verify);
- CLP decode step (PLT, L > 1): one call with loops=[1, ..., L] and T = 1 (the L rows of
  SPEC section 4 in one pass);
- naive decode step: the prefill calls with T = 1.
Row groups of several loops need T = 1 (loop r's input is loop r-1's output one token
earlier).

Cache layouts (inputs `past*`, outputs `present*`; G = KV heads, D = head dim, R = L - 1):
  past_key_values.{i}.key/value  [B, G, S, D]     loop-1 post-RoPE K/V, slot = position
  past_ring.{i}.key/value        [R, B, G, Wr, D] loop r >= 2 K/V, position p in slot p % W;
                                                  Wr = min(W, capacity) slots (the caller
                                                  grows them with the capacity, up to W)
  past_carry                     [R, B, d]        n(h^(r)) of the last position, r < L
  past_hidden                    [B, T, d]        the previous loop's output over the chunk
                                                  (PLT: n(h) shifted one token, the first
                                                  token taking the carry before the chunk)
Every sequence has its own position: `start[b]` = tokens already in its caches. A chunk holds
`num_new[b]` valid tokens of sequence b (right-padded to T); padded tokens write global slots
>= the sequence's new length, which are never read before being overwritten, so the caller
keeps start[b] + T <= S. Ring slots and the carry take only valid tokens.

G-SWA is the custom op `plt::GatedSlidingWindowAttention` (SPEC section 7); its body, a
model-local function, is two opset-23 `Attention` ops and the gate mix. Every row runs it:
a loop-1 row's gate is 1 (its local branch, over its own loop's keys, is weighted 0).

MatMul weights may be stored quantized (int4/int8, `com.microsoft::MatMulNBits`), with
float32 activations; the embedding table is then kept in float16 and its rows cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from plt_port.config import PLTConfig

from .onnx_layout import SCALE_DTYPE, Quantization, aligned, stored_dtype, weight_specs

OPSET = 23
PLT_DOMAIN = "plt"
MS_DOMAIN = "com.microsoft"
GSWA_OP = "GatedSlidingWindowAttention"
DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


# ---- the custom op --------------------------------------------------------------------
def gswa_function() -> onnx.FunctionProto:
    """y = g * attn(q, global K/V, global_mask) + (1 - g) * attn(q, local K/V, local_mask).

    q [B, H, T, D]; global_k/v [B, G, Sg, D]; local_k/v [B, G, Sl, D]; masks bool
    [B, 1, T, S*] (True = visible, at least one per row); gate [B, H, T] = share of the
    global branch; attribute `scale`. Output [B, H, T, D].
    """
    attention = []
    for branch in ("global", "local"):
        node = helper.make_node("Attention", ["q", f"{branch}_k", f"{branch}_v",
                                              f"{branch}_mask"], [f"y_{branch}"])
        node.attribute.append(helper.make_attribute_ref("scale", onnx.AttributeProto.FLOAT))
        attention.append(node)
    nodes = attention + [
        helper.make_node("Constant", [], ["axis"], value_ints=[-1]),
        helper.make_node("Unsqueeze", ["gate", "axis"], ["g"]),
        helper.make_node("Constant", [], ["one_f"], value_float=1.0),
        helper.make_node("CastLike", ["one_f", "g"], ["one"]),
        helper.make_node("Sub", ["one", "g"], ["one_minus_g"]),
        helper.make_node("Mul", ["g", "y_global"], ["gated_global"]),
        helper.make_node("Mul", ["one_minus_g", "y_local"], ["gated_local"]),
        helper.make_node("Add", ["gated_global", "gated_local"], ["y"]),
    ]
    return helper.make_function(
        PLT_DOMAIN, GSWA_OP,
        ["q", "global_k", "global_v", "global_mask", "local_k", "local_v", "local_mask", "gate"],
        ["y"], nodes, opset_imports=[helper.make_opsetid("", OPSET)], attributes=["scale"],
        doc_string=gswa_function.__doc__)


# ---- weights ----------------------------------------------------------------------------
@dataclass
class QuantizedMatMul:
    """A [K, N] MatMul weight as MatMulNBits stores it."""

    packed: np.ndarray                  # uint8 [N, K blocks, block bytes]
    scales: np.ndarray                  # float32 [N, K blocks]
    zero_points: np.ndarray | None      # uint8, None when symmetric
    k: int
    n: int


def quantize_matmul(weight: np.ndarray, quant: Quantization) -> QuantizedMatMul:
    """Quantize a [K, N] weight with ORT's own block quantizer (what ORT GenAI's builder uses)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = weight.shape
    blocks = quant.blocks(k)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if blocks * quant.block_size != k:
        weight = np.pad(weight, ((0, blocks * quant.block_size - k), (0, 0)))
    packed = np.zeros((n, blocks, quant.block_bytes), np.uint8)
    scales = np.zeros(n * blocks, SCALE_DTYPE)
    zero_points = np.zeros(quant.zero_point_bytes(k, n), np.uint8)
    quantizer = quantize_matmul_4bits if quant.bits == 4 else quantize_matmul_8bits
    quantizer(packed, weight, scales, zero_points, quant.block_size, n, k, quant.symmetric)
    return QuantizedMatMul(packed, scales.reshape(n, blocks),
                           None if quant.symmetric else zero_points.reshape(n, -1), k, n)


def onnx_weights(config: PLTConfig, tensors, dtype, quant: Quantization | None = None):
    """Yield (name, array or QuantizedMatMul) one at a time, as `onnx_layout.weight_specs`
    lays them out. `tensors` is read one tensor (one fused group) at a time, so a lazy
    checkpoint is held a layer at most."""
    for spec in weight_specs(config, quant):
        if spec.layout == "matmul":  # [out, in] checkpoint tensors -> one [in, sum(out)] weight
            fused = np.concatenate([tensors[n].T for n in spec.sources], axis=1)
            yield spec.name, quantize_matmul(fused, quant) if quant else fused.astype(dtype)
            continue
        array = np.ascontiguousarray(tensors[spec.sources[0]], stored_dtype(spec, dtype, quant))
        if spec.layout == "transposed":
            array = array.T.copy()
        yield spec.name, array if spec.shape is None else array.reshape(spec.shape)


def weight_count(config: PLTConfig, quant: Quantization | None = None) -> int:
    """How many (name, weight) pairs `onnx_weights` yields, for a progress bar."""
    return len(weight_specs(config, quant))


class WeightsFile:
    """One external-data file for the graph: each tensor written as it comes, page-aligned,
    and only its place remembered (the file is never held in memory)."""

    def __init__(self, path: str, location: str):
        self.path, self.location = path, location
        self.entries: dict[str, tuple[int, int, np.dtype, tuple]] = {}
        self.matmul_shapes: dict[str, tuple[int, int]] = {}  # quantized weight -> (K, N)

    def write(self, weights) -> None:
        """`weights`: (name, array or QuantizedMatMul) pairs, as `onnx_weights` yields them."""
        offset = 0
        with open(self.path, "wb") as f:
            for name, value in weights:
                if isinstance(value, QuantizedMatMul):
                    self.matmul_shapes[name] = (value.k, value.n)
                    arrays = {name: value.packed, f"{name}.scales": value.scales}
                    if value.zero_points is not None:
                        arrays[f"{name}.zero_points"] = value.zero_points
                else:
                    arrays = {name: value}
                for key, array in arrays.items():
                    array = np.ascontiguousarray(array)
                    offset = aligned(offset)
                    f.seek(offset)
                    f.write(memoryview(array.reshape(-1).view(np.uint8)))
                    self.entries[key] = (offset, array.nbytes, array.dtype, array.shape)
                    offset += array.nbytes

    def table(self) -> dict[str, dict]:
        """name -> offset, length, dtype, shape: enough for a runtime to map the file itself."""
        return {name: {"offset": offset, "length": length, "dtype": dtype.name,
                       "shape": list(shape)}
                for name, (offset, length, dtype, shape) in self.entries.items()}

    def tensor(self, name: str) -> TensorProto:
        offset, length, dtype, shape = self.entries[name]
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype),
                            dims=shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", offset), ("length", length)):
            proto.external_data.add(key=key, value=str(value))
        return proto


# ---- graph builder ----------------------------------------------------------------------
class GraphBuilder:
    """Nodes with generated names; constants as Constant nodes; weights as external initializers."""

    def __init__(self, config: PLTConfig, loops: int, dtype: str, weights: WeightsFile,
                 quant: Quantization | None = None):
        self.cfg, self.loops, self.quant = config, loops, quant
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.weights = weights
        self.nodes, self.inputs, self.outputs = [], [], []
        self.initializers: dict[str, TensorProto] = {}
        self._constants: dict = {}
        self._count = 0

    def op(self, op_type: str, *inputs: str, name: str | None = None, n_out: int = 1,
           domain: str = "", **attrs):
        self._count += 1
        outs = [name] if name else [f"{op_type.lower()}_{self._count}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain,
                                           name=f"{op_type}_{self._count}", **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._count += 1
            name = f"const_{self._count}"
            self.nodes.append(helper.make_node("Constant", [], [name],
                                               value=onnx.numpy_helper.from_array(array, name)))
            self._constants[key] = name
        return self._constants[key]

    def ints(self, *values) -> str:
        return self.const(list(values), np.int64)

    def scalar(self, value: float) -> str:
        return self.const(value, self.np_dtype)

    def weight(self, name: str) -> str:
        if name not in self.initializers:
            self.initializers[name] = self.weights.tensor(name)
        return name

    def matmul(self, x: str, name: str) -> str:
        """x @ weight `name` ([in, out]): MatMul, or MatMulNBits for a quantized weight."""
        if name not in self.weights.matmul_shapes:
            return self.op("MatMul", x, self.weight(name))
        k, n = self.weights.matmul_shapes[name]
        inputs = [x, self.weight(name), self.weight(f"{name}.scales")]
        if not self.quant.symmetric:
            inputs.append(self.weight(f"{name}.zero_points"))
        return self.op("MatMulNBits", *inputs, domain=MS_DOMAIN, K=k, N=n, bits=self.quant.bits,
                       block_size=self.quant.block_size,
                       accuracy_level=self.quant.accuracy_level)

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def model(self, graph_name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs,
                                  initializer=list(self.initializers.values()))
        domains = [("", OPSET), (PLT_DOMAIN, 1)] + ([(MS_DOMAIN, 1)] if self.quant else [])
        return helper.make_model(graph, functions=[gswa_function()], ir_version=10,
                                 producer_name="plt-port",
                                 opset_imports=[helper.make_opsetid(*d) for d in domains])

    # ---- small pieces -----------------------------------------------------------------
    def dim(self, tensor: str, axis: int) -> str:
        """Size of one axis as a [1] int64 tensor."""
        return self.op("Shape", tensor, start=axis, end=axis + 1)

    def arange(self, length: str) -> str:
        """0..length-1 (int64) for a [1] length."""
        return self.op("Range", self.const(0, np.int64), self.op("Squeeze", length),
                       self.const(1, np.int64))

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.ints(*axes))

    def rms_norm(self, x: str, weight: str) -> str:
        return self.op("RMSNormalization", x, self.weight(weight), axis=-1,
                       epsilon=self.cfg.rms_norm_eps)

    def scaled(self, x: str, factor: float) -> str:
        return x if factor == 1.0 else self.op("Mul", x, self.scalar(factor))


# ---- model pieces -------------------------------------------------------------------------
@dataclass
class Heads:
    q: str      # [B, H, N, D] post-RoPE
    k: str      # [B, G, N, D] post-RoPE
    v: str      # [B, G, N, D]


def rope_tables(b: GraphBuilder, positions: str) -> tuple[str, str]:
    """cos, sin [B, N, D/2] of HF RoPE at int64 `positions` [B, N] (computed in fp32)."""
    cfg = b.cfg
    D = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, D, 2, dtype=np.float32)
                                                        / np.float32(D)))).astype(np.float32)
    angles = b.op("Mul", b.unsqueeze(b.op("Cast", positions, to=TensorProto.FLOAT), -1),
                  b.const(inv_freq))
    cos, sin = b.op("Cos", angles), b.op("Sin", angles)
    if b.onnx_dtype != TensorProto.FLOAT:
        cos, sin = (b.op("Cast", t, to=b.onnx_dtype) for t in (cos, sin))
    return cos, sin


def project(b: GraphBuilder, layer: int, x: str, cos: str, sin: str) -> Heads:
    cfg = b.cfg
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = b.matmul(x, f"layers.{layer}.qkv_proj")
    q, k, v = b.op("Split", qkv, b.ints(H * D, G * D, G * D), axis=-1, n_out=3)

    def heads(t, n):  # [B, N, n*D] -> [B, n, N, D]
        return b.op("Transpose", b.op("Reshape", t, b.ints(0, 0, n, D)), perm=[0, 2, 1, 3])

    q, k, v = heads(q, H), heads(k, G), heads(v, G)
    return Heads(b.op("RotaryEmbedding", q, cos, sin), b.op("RotaryEmbedding", k, cos, sin), v)


def gate(b: GraphBuilder, layer: int, x_res: str, q: str) -> str:
    """g = sigmoid(gate_logit) [B, H, N]; hidden form from RMSNorm_g(block input), else from q."""
    if b.cfg.gate_uses_hidden:
        normed = b.rms_norm(x_res, f"layers.{layer}.gate_norm")
        logit = b.op("Add", b.op("MatMul", normed, b.weight(f"layers.{layer}.gate_proj")),
                     b.weight(f"layers.{layer}.gate_bias"))
        logit = b.op("Transpose", logit, perm=[0, 2, 1])
    else:
        logit = b.op("ReduceSum", b.op("Mul", q, b.weight(f"layers.{layer}.gate_proj")),
                     b.ints(-1), keepdims=0)
        logit = b.op("Add", logit, b.weight(f"layers.{layer}.gate_bias"))
    return b.op("Sigmoid", logit)


def gswa(b: GraphBuilder, q, global_kv, global_mask, local_kv, local_mask, g) -> str:
    return b.op(GSWA_OP, q, *global_kv, global_mask, *local_kv, local_mask, g,
                domain=PLT_DOMAIN, scale=1.0 / math.sqrt(b.cfg.head_dim))


def decoder_layer(b: GraphBuilder, layer: int, h: str, cos: str, sin: str, attention) -> str:
    """Pre-norm Llama block; `attention(heads, x_res) -> y [B, H, N, D]` owns the K/V."""
    cfg = b.cfg
    H, D, inter = cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    heads = project(b, layer, b.rms_norm(h, f"layers.{layer}.input_layernorm"), cos, sin)
    y = attention(heads, h)
    y = b.op("Reshape", b.op("Transpose", y, perm=[0, 2, 1, 3]), b.ints(0, 0, H * D))
    h = b.op("Add", h, b.matmul(y, f"layers.{layer}.o_proj"))
    x = b.rms_norm(h, f"layers.{layer}.post_attention_layernorm")
    gate_up = b.matmul(x, f"layers.{layer}.gate_up_proj")
    gate_part, up = b.op("Split", gate_up, b.ints(inter, inter), axis=-1, n_out=2)
    act = b.op("Mul", b.op("Mul", gate_part, b.op("Sigmoid", gate_part)), up)
    return b.op("Add", h, b.matmul(act, f"layers.{layer}.down_proj"))


def loop_carry(b: GraphBuilder, h: str) -> str:
    """n(h): FinalNorm(h) when plt_normalize_per_loop, else h."""
    return b.rms_norm(h, "norm") if b.cfg.plt_normalize_per_loop else h


def next_loop_input(b: GraphBuilder, embeddings: str, shifted_carry: str) -> str:
    """u^(r) = a * E + b * shifted n(h^(r-1))."""
    return b.op("Add", b.scaled(embeddings, b.cfg.emb_scale),
                b.scaled(shifted_carry, b.cfg.hidden_scale))


def embed(b: GraphBuilder, ids: str) -> str:
    rows = b.op("Gather", b.weight("embed_tokens"), ids)
    stored = b.weights.entries["embed_tokens"][2]
    return rows if stored == b.np_dtype else b.op("Cast", rows, to=b.onnx_dtype)


def lm_logits(b: GraphBuilder, h_last: str) -> str:
    """[B, d] -> fp32 logits [B, V]."""
    normed = b.rms_norm(h_last, "norm")
    if "lm_head" in b.weights.matmul_shapes:
        logits = b.matmul(normed, "lm_head")
    else:
        head = "embed_tokens" if b.cfg.tie_word_embeddings else "lm_head"
        logits = b.op("Gemm", normed, b.weight(head), transB=1)
    return logits if b.onnx_dtype == TensorProto.FLOAT else b.op("Cast", logits,
                                                                   to=TensorProto.FLOAT)


def kv_slot_indices(b: GraphBuilder, batch: str, slots: str) -> str:
    """ScatterND/GatherND indices [B, G, T, 3] addressing (b, g, slots[b, t]); slots [B, T]."""
    G = b.cfg.num_key_value_heads
    shape = b.op("Concat", batch, b.ints(G), b.dim(slots, 1), axis=0)
    axes = [b.op("Reshape", b.arange(batch), b.ints(-1, 1, 1)),
            b.op("Reshape", b.arange(b.ints(G)), b.ints(1, -1, 1)),
            b.unsqueeze(slots, 1)]
    return b.op("Concat", *[b.unsqueeze(b.op("Expand", a, shape), -1) for a in axes], axis=-1)


def take_rows(b: GraphBuilder, x: str, last: str, count: str) -> str:
    """x [B, T, d], last [B], count [1] -> x[b, last[b] - count + 1 .. last[b]] as [B * count, d]
    (row indices below 0 clamped to 0)."""
    d = b.cfg.hidden_size
    first = b.op("Sub", b.unsqueeze(last, 1), b.op("Sub", count, b.ints(1)))           # [B, 1]
    index = b.op("Max", b.op("Add", first, b.unsqueeze(b.arange(count), 0)), b.ints(0))  # [B, R]
    idx = b.op("Expand", b.unsqueeze(index, 2),
               b.op("Concat", b.dim(x, 0), count, b.ints(d), axis=0))
    return b.op("Reshape", b.op("GatherElements", x, idx, axis=1), b.ints(-1, d))


def ring_positions(b: GraphBuilder, newest: str, slots: str) -> str:
    """`plt_port.cache_layout.ring_slot_positions` as graph ops: the position ring slot
    slots[j] holds when `newest` [B] is the latest written, newest - ((newest - slot) mod W)
    -> [B, J] (negative: slot never written)."""
    newest = b.unsqueeze(newest, 1)
    return b.op("Sub", newest, b.op("Mod", b.op("Sub", newest, b.unsqueeze(slots, 0)),
                                    b.ints(b.cfg.window)))


def causal_global_mask(b: GraphBuilder, global_key: str, positions: str) -> str:
    """[B, 1, N, S]: global slot s visible to the row at positions[b, n] iff s <= it."""
    capacity_slots = b.arange(b.dim(global_key, 2))
    return b.op("LessOrEqual", b.op("Reshape", capacity_slots, b.ints(1, 1, 1, -1)),
                b.op("Reshape", positions, b.ints(0, 1, -1, 1)))


def io_dims(cfg: PLTConfig, loops: int) -> dict[str, list]:
    G, D, d = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    return {"global": ["batch", G, "capacity", D], "ring": [loops - 1, "batch", G, "ring_slots", D],
            "carry": [loops - 1, "batch", d], "hidden": ["batch", "chunk", d]}


# ---- the graph ------------------------------------------------------------------------------
@dataclass
class Rows:
    """The rows of one call: group k (loop loops[k]) holds the T tokens; N = K * T rows."""

    loops: str          # [K] loop number of each group
    row_loops: str      # [N]
    positions: str      # [B, N]
    valid: str          # [B, N] a real (not padding) token
    is_loop1: str       # [N] bool
    chunk: str          # [1] T


def call_rows(b: GraphBuilder, loops: str, start: str, num_new: str, steps: str) -> Rows:
    K, T = b.dim(loops, 0), b.dim(steps, 0)
    positions = b.op("Add", b.unsqueeze(start, 1), b.unsqueeze(steps, 0))           # [B, T]
    valid = b.op("Less", b.unsqueeze(steps, 0), b.unsqueeze(num_new, 1))             # [B, T]
    tile = b.op("Concat", b.ints(1), K, axis=0)
    row_loops = b.op("Reshape", b.op("Expand", b.unsqueeze(loops, 1),
                                     b.op("Concat", K, T, axis=0)), b.ints(-1))
    return Rows(loops, row_loops, b.op("Tile", positions, tile), b.op("Tile", valid, tile),
                b.op("Equal", row_loops, b.ints(1)), T)


def row_inputs(b: GraphBuilder, rows: Rows, embeddings: str, past_carry, past_hidden) -> str:
    """[B, N, d]: loop 1's rows take E; PLT loop r >= 2 rows take a E + b s, s being carry[r-1]
    in a CLP step (several groups, T = 1) and past_hidden (loop r-1's output already shifted
    one token by the previous call) otherwise; v1 loop r >= 2 rows take past_hidden."""
    if past_hidden is None:
        return embeddings
    d = b.cfg.hidden_size
    if past_carry is None:  # v1
        later = b.unsqueeze(past_hidden, 0)
    else:
        carry_index = b.op("Max", b.op("Sub", rows.loops, b.ints(2)), b.ints(0))
        carry_rows = b.unsqueeze(b.op("Gather", past_carry, carry_index, axis=0), 2)  # [K, B, 1, d]
        one_group = b.op("Squeeze", b.op("Equal", b.dim(rows.loops, 0), b.ints(1)))
        shifted = b.op("Where", one_group, b.unsqueeze(past_hidden, 0), carry_rows)
        later = next_loop_input(b, embeddings, shifted)                                # [K, B, T, d]
    first_loop = b.op("Reshape", b.op("Equal", rows.loops, b.ints(1)), b.ints(-1, 1, 1, 1))
    grouped = b.op("Where", first_loop, embeddings, later)                             # [K, B, T, d]
    return b.op("Reshape", b.op("Transpose", grouped, perm=[1, 0, 2, 3]), b.ints(0, -1, d))


def shifted_handover(b: GraphBuilder, rows: Rows, outputs: str, past_carry: str) -> str:
    """[B, T, d]: the last group's n(h) over the chunk moved one token later, its first token
    taking that loop's carry from before this call: the next loop's shifted input."""
    R = b.loops - 1
    loop = b.op("Gather", rows.loops, b.op("Sub", b.dim(rows.loops, 0), b.ints(1)))   # [1]
    carry = b.op("Gather", past_carry, b.op("Min", b.op("Sub", loop, b.ints(1)), b.ints(R - 1)),
                 axis=0)                                                              # [1, B, d]
    T = b.dim(outputs, 1)
    earlier = b.op("Slice", outputs, b.ints(0), b.op("Sub", T, b.ints(1)), b.ints(1))
    return b.op("Concat", b.op("Transpose", carry, perm=[1, 0, 2]), earlier, axis=1)


def ring_window(b: GraphBuilder, rows: Rows, start: str, num_new: str, batch: str,
                past_ring: str) -> tuple[str, str]:
    """Local keys are [the R rings side by side ; the call's rows]. Returns the local mask
    [B, 1, N, R*Wr + N] (a row sees keys of its own loop within the window, itself included)
    and the GatherElements source [B, G, R*Wr, D] of each ring slot after the call: the
    call's row of that loop holding the newest valid position of that slot, else the slot's
    old entry (`past_ring` gives Wr, the ring slots)."""
    R = b.loops - 1
    G, D = b.cfg.num_key_value_heads, b.cfg.head_dim
    slots = b.dim(past_ring, 3)                                                      # [1] Wr
    ring_width = b.op("Mul", slots, b.ints(R))
    ring_index = b.arange(ring_width)                                                # [RWr]
    ring_loops = b.op("Add", b.op("Div", ring_index, slots), b.ints(2))
    slot = b.op("Mod", ring_index, slots)
    held = ring_positions(b, b.op("Sub", start, b.ints(1)), slot)                   # [B, RWr]
    key_loops = b.op("Concat", ring_loops, rows.row_loops, axis=0)
    key_positions = b.unsqueeze(b.op("Concat", held, rows.positions, axis=1), 1)    # [B, 1, RWr+N]
    distance = b.op("Sub", b.unsqueeze(rows.positions, 2), key_positions)          # [B, N, RWr+N]
    same_loop = b.op("Equal", b.unsqueeze(rows.row_loops, 1), b.unsqueeze(key_loops, 0))
    visible = b.op("And", b.op("And", b.op("GreaterOrEqual", distance, b.ints(0)),
                               b.op("Less", distance, b.ints(b.cfg.window))),
                   b.op("And", b.op("GreaterOrEqual", key_positions, b.ints(0)), same_loop))

    # the group of this call that runs each slot's loop, if any, and the newest valid position
    # of the slot: written by this call when it is >= start
    in_group = b.op("Cast", b.op("Equal", b.unsqueeze(ring_loops, 1), b.unsqueeze(rows.loops, 0)),
                    to=TensorProto.INT64)                                            # [RWr, K]
    group = b.op("ArgMax", in_group, axis=1, keepdims=0)                             # [RWr]
    loop_runs = b.op("Cast", b.op("ReduceMax", in_group, b.ints(1), keepdims=0),
                     to=TensorProto.BOOL)
    newest = ring_positions(b, b.op("Sub", b.op("Add", start, num_new), b.ints(1)), slot)
    written = b.op("And", b.op("GreaterOrEqual", newest, b.unsqueeze(start, 1)),
                   b.unsqueeze(loop_runs, 0))                                        # [B, RWr]
    row = b.op("Add", b.op("Mul", group, rows.chunk),
               b.op("Sub", newest, b.unsqueeze(start, 1)))                           # [B, RWr]
    source = b.op("Where", written, b.op("Add", row, ring_width), ring_index)
    source = b.op("Expand", b.op("Reshape", source, b.ints(0, 1, -1, 1)),
                  b.op("Concat", batch, b.ints(G), ring_width, b.ints(D), axis=0))
    return b.unsqueeze(visible, 1), source


def new_carry(b: GraphBuilder, rows: Rows, outputs: str, past_carry: str, num_new: str) -> str:
    """[R, B, d]: carry[r-1] <- loop r's output at each sequence's last valid token when loop
    r < L ran in this call (and the sequence had tokens), else kept."""
    R, d = b.loops - 1, b.cfg.hidden_size
    last = b.op("Max", b.op("Sub", num_new, b.ints(1)), b.ints(0))
    index = b.op("Expand", b.op("Reshape", last, b.ints(-1, 1, 1, 1)),
                 b.op("Concat", b.dim(outputs, 0), b.dim(outputs, 1), b.ints(1, d), axis=0))
    per_group = b.op("Transpose", b.op("Squeeze", b.op("GatherElements", outputs, index, axis=2),
                                       b.ints(2)), perm=[1, 0, 2])                   # [K, B, d]
    ran = b.op("Cast", b.op("Equal", b.const(np.arange(1, R + 1, dtype=np.int64)[:, None]),
                            b.unsqueeze(rows.loops, 0)), to=TensorProto.INT64)      # [R, K]
    picked = b.op("Gather", per_group, b.op("ArgMax", ran, axis=1, keepdims=0), axis=0)
    take = b.op("And", b.op("Reshape", b.op("Cast", b.op("ReduceMax", ran, b.ints(1), keepdims=0),
                                            to=TensorProto.BOOL), b.ints(-1, 1, 1)),
                b.op("Reshape", b.op("Greater", num_new, b.ints(0)), b.ints(1, -1, 1)))
    return b.op("Where", take, picked, past_carry)


def build_step(b: GraphBuilder) -> onnx.ModelProto:
    cfg, L = b.cfg, b.loops
    R, D, d = L - 1, cfg.head_dim, cfg.hidden_size
    dims = io_dims(cfg, L)
    ids = b.input("input_ids", TensorProto.INT64, ["batch", "chunk"])
    start = b.input("start", TensorProto.INT64, ["batch"])
    num_new = b.input("num_new", TensorProto.INT64, ["batch"])
    loops = b.input("loops", TensorProto.INT64, ["groups"])
    logit_rows = b.input("logit_rows", TensorProto.INT64, [1])
    past = [{kv: b.input(f"past_key_values.{i}.{kv}", b.onnx_dtype, dims["global"])
             for kv in ("key", "value")} for i in range(cfg.num_hidden_layers)]
    if L > 1:
        for i, layer in enumerate(past):
            layer.update({f"ring_{kv}": b.input(f"past_ring.{i}.{kv}", b.onnx_dtype, dims["ring"])
                          for kv in ("key", "value")})
    has_carry = L > 1 and not cfg.is_v1
    past_carry = b.input("past_carry", b.onnx_dtype, dims["carry"]) if has_carry else None
    past_hidden = b.input("past_hidden", b.onnx_dtype, dims["hidden"]) if L > 1 else None

    batch, T = b.dim(ids, 0), b.dim(ids, 1)
    rows = call_rows(b, loops, start, num_new, b.arange(T))
    h = row_inputs(b, rows, embed(b, ids), past_carry, past_hidden)                  # [B, N, d]
    cos, sin = rope_tables(b, rows.positions)
    global_slots = kv_slot_indices(b, batch, b.op("Slice", rows.positions, b.ints(0), T,
                                                  b.ints(1)))
    global_mask = causal_global_mask(b, past[0]["key"], rows.positions)
    writes_global = b.op("Equal", b.op("Gather", loops, b.const(0, np.int64)),
                         b.const(1, np.int64))
    if L > 1:
        local_mask, ring_source = ring_window(b, rows, start, num_new, batch,
                                              past[0]["ring_key"])
        loop1_rows = b.op("Reshape", rows.is_loop1, b.ints(1, 1, -1))
    present_ring = [{} for _ in range(cfg.num_hidden_layers)]

    for i in range(cfg.num_hidden_layers):
        def attention(heads, x_res, i=i):
            # group 0's rows write their global slots when they are loop 1's; otherwise the
            # slots are rewritten with what they hold
            global_kv = []
            for n, t in (("key", heads.k), ("value", heads.v)):
                kept = b.op("GatherND", past[i][n], global_slots)
                update = b.op("Where", writes_global,
                              b.op("Slice", t, b.ints(0), T, b.ints(2)), kept)
                global_kv.append(b.op("ScatterND", past[i][n], global_slots, update,
                                      name=f"present.{i}.{n}"))
            if L == 1:
                return b.op("Attention", heads.q, *global_kv, global_mask)
            local_kv = []
            for n, t in (("key", heads.k), ("value", heads.v)):
                rings = b.op("Reshape", b.op("Transpose", past[i][f"ring_{n}"],
                                             perm=[1, 2, 0, 3, 4]), b.ints(0, 0, -1, D))
                keys = b.op("Concat", rings, t, axis=2)                             # [B, G, RW+N, D]
                local_kv.append(keys)
                kept = b.op("GatherElements", keys, ring_source, axis=2)
                present_ring[i][n] = b.op("Transpose", b.op("Reshape", kept,
                                                            b.ints(0, 0, R, -1, D)),
                                          perm=[2, 0, 1, 3, 4])
            g = b.op("Where", loop1_rows, b.scalar(1.0), gate(b, i, x_res, heads.q))
            return gswa(b, heads.q, global_kv, global_mask, local_kv, local_mask, g)
        h = decoder_layer(b, i, h, cos, sin, attention)

    group_shape = b.op("Concat", batch, b.dim(loops, 0), T, b.ints(d), axis=0)
    last_group = b.op("Squeeze", b.op("Sub", b.dim(loops, 0), b.ints(1)))
    last = b.op("Max", b.op("Sub", num_new, b.ints(1)), b.ints(0))
    h_last = b.op("Gather", b.op("Reshape", h, group_shape), last_group, axis=1)       # [B, T, d]
    b.output(lm_logits(b, take_rows(b, h_last, last, logit_rows)), "logits", TensorProto.FLOAT,
             ["logit_rows_of_batch", cfg.vocab_size])
    for i in range(cfg.num_hidden_layers):
        for n in ("key", "value"):
            b.output(f"present.{i}.{n}", f"present.{i}.{n}", b.onnx_dtype, dims["global"])
        for n in present_ring[i]:
            b.output(present_ring[i][n], f"present_ring.{i}.{n}", b.onnx_dtype, dims["ring"])
    if L > 1:
        outputs = b.op("Reshape", h if cfg.is_v1 else loop_carry(b, h), group_shape)  # [B, K, T, d]
        handover = b.op("Gather", outputs, last_group, axis=1)                          # [B, T, d]
        if has_carry:
            b.output(new_carry(b, rows, outputs, past_carry, num_new), "present_carry",
                     b.onnx_dtype, dims["carry"])
            handover = shifted_handover(b, rows, handover, past_carry)
        b.output(handover, "present_hidden", b.onnx_dtype, dims["hidden"])
    return b.model("plt_step")
