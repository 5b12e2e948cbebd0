"""PLT as hand-built ONNX graphs (onnx.helper only, no torch), in the manner of the
onnxruntime-genai model builder.

Two graphs share one weights file:
- prefill: T tokens per sequence, loop by loop over the chunk (SPEC section 4). With T = 1
  it is also the naive (sequential) decode step.
- decode:  the CLP step of PLT checkpoints (L > 1): L rows [E, a E + b carry_1, ...] at one
  position through the stack in one pass.

Cache layouts (inputs `past*`, outputs `present*`; G = KV heads, D = head dim, R = L - 1):
  past_key_values.{i}.key/value  [B, G, S, D]     loop-1 post-RoPE K/V, slot = position
  past_ring.{i}.key/value        [R, B, G, W, D]  loop r >= 2 K/V, position p in slot p % W
  past_carry                     [R, B, d]        n(h^(r)) of the last position, r < L
Every sequence has its own position: `start[b]` = tokens already in its caches. A prefill
chunk holds `num_new[b]` valid tokens of sequence b (right-padded to T); padded tokens write
global slots >= the sequence's new length, which are never read before being overwritten, so
the caller keeps start[b] + T <= S. Ring slots and the carry take only valid tokens.

G-SWA is the custom op `plt::GatedSlidingWindowAttention` (SPEC section 7); its body, a
model-local function, is two opset-23 `Attention` ops and the gate mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from plt_port.config import PLTConfig

OPSET = 23
PLT_DOMAIN = "plt"
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
def onnx_weights(config: PLTConfig, tensors: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    """Checkpoint tensors in the layouts the graphs use: MatMul weights as [in, out], q/k/v
    and gate/up fused; the LM head keeps [V, d] (Gemm transB) so a tied head is the embedding."""
    out = {"embed_tokens": tensors["model.embed_tokens.weight"],
           "norm": tensors["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head"] = tensors["lm_head.weight"]
    H, D = config.num_attention_heads, config.head_dim
    for i in range(config.num_hidden_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out[f"layers.{i}.qkv_proj"] = np.concatenate(
            [tensors[a + f"{n}_proj.weight"].T for n in "qkv"], axis=1)
        out[f"layers.{i}.o_proj"] = tensors[a + "o_proj.weight"].T
        out[f"layers.{i}.gate_up_proj"] = np.concatenate(
            [tensors[p + "mlp.gate_proj.weight"].T, tensors[p + "mlp.up_proj.weight"].T], axis=1)
        out[f"layers.{i}.down_proj"] = tensors[p + "mlp.down_proj.weight"].T
        out[f"layers.{i}.input_layernorm"] = tensors[p + "input_layernorm.weight"]
        out[f"layers.{i}.post_attention_layernorm"] = tensors[p + "post_attention_layernorm.weight"]
        gate = f"model.gate_projections.{i}." if config.is_v1 else a + "plt_gate."
        if config.gate_uses_hidden:
            out[f"layers.{i}.gate_proj"] = tensors[gate + "weight"].T            # [d, H]
            out[f"layers.{i}.gate_bias"] = tensors[gate + "bias"]                 # [H]
            out[f"layers.{i}.gate_norm"] = tensors[gate + "gate_norm.weight"]
        else:
            out[f"layers.{i}.gate_proj"] = tensors[gate + "weight"].reshape(1, H, 1, D)
            out[f"layers.{i}.gate_bias"] = tensors[gate + "bias"].reshape(1, H, 1)
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in out.items()}


class WeightsFile:
    """One external-data file shared by every graph: each tensor stored once, page-aligned."""

    ALIGN = 4096

    def __init__(self, path: str, location: str):
        self.path, self.location = path, location
        self.entries: dict[str, tuple[int, int, np.ndarray]] = {}

    def write(self, weights: dict[str, np.ndarray]) -> None:
        offset = 0
        with open(self.path, "wb") as f:
            for name, array in weights.items():
                offset = -(-offset // self.ALIGN) * self.ALIGN
                f.seek(offset)
                f.write(array.tobytes())
                self.entries[name] = (offset, array.nbytes, array)
                offset += array.nbytes

    def table(self) -> dict[str, dict]:
        """name -> offset, length, dtype, shape: enough for a runtime to map the file itself."""
        return {name: {"offset": offset, "length": length, "dtype": array.dtype.name,
                       "shape": list(array.shape)}
                for name, (offset, length, array) in self.entries.items()}

    def tensor(self, name: str) -> TensorProto:
        offset, length, array = self.entries[name]
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                            dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", offset), ("length", length)):
            proto.external_data.add(key=key, value=str(value))
        return proto


# ---- graph builder ----------------------------------------------------------------------
class GraphBuilder:
    """Nodes with generated names; constants as Constant nodes; weights as external initializers."""

    def __init__(self, config: PLTConfig, loops: int, dtype: str, weights: WeightsFile):
        self.cfg, self.loops = config, loops
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
        return helper.make_model(graph, functions=[gswa_function()], ir_version=10,
                                 producer_name="plt-port",
                                 opset_imports=[helper.make_opsetid("", OPSET),
                                                helper.make_opsetid(PLT_DOMAIN, 1)])

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


# ---- model pieces shared by both graphs -------------------------------------------------
@dataclass
class Heads:
    q: str      # [B, H, T, D] post-RoPE
    k: str      # [B, G, T, D] post-RoPE
    v: str      # [B, G, T, D]


def rope_tables(b: GraphBuilder, positions: str) -> tuple[str, str]:
    """cos, sin [B, T, D/2] of HF RoPE at int64 `positions` [B, T] (computed in fp32)."""
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
    qkv = b.op("MatMul", x, b.weight(f"layers.{layer}.qkv_proj"))
    q, k, v = b.op("Split", qkv, b.ints(H * D, G * D, G * D), axis=-1, n_out=3)

    def heads(t, n):  # [B, T, n*D] -> [B, n, T, D]
        return b.op("Transpose", b.op("Reshape", t, b.ints(0, 0, n, D)), perm=[0, 2, 1, 3])

    q, k, v = heads(q, H), heads(k, G), heads(v, G)
    return Heads(b.op("RotaryEmbedding", q, cos, sin), b.op("RotaryEmbedding", k, cos, sin), v)


def gate(b: GraphBuilder, layer: int, x_res: str, q: str) -> str:
    """g = sigmoid(gate_logit) [B, H, T]; hidden form from RMSNorm_g(block input), else from q."""
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
    """Pre-norm Llama block; `attention(heads, x_res) -> y [B, H, T, D]` owns the K/V."""
    cfg = b.cfg
    H, D, inter = cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    heads = project(b, layer, b.rms_norm(h, f"layers.{layer}.input_layernorm"), cos, sin)
    y = attention(heads, h)
    y = b.op("Reshape", b.op("Transpose", y, perm=[0, 2, 1, 3]), b.ints(0, 0, H * D))
    h = b.op("Add", h, b.op("MatMul", y, b.weight(f"layers.{layer}.o_proj")))
    x = b.rms_norm(h, f"layers.{layer}.post_attention_layernorm")
    gate_up = b.op("MatMul", x, b.weight(f"layers.{layer}.gate_up_proj"))
    gate_part, up = b.op("Split", gate_up, b.ints(inter, inter), axis=-1, n_out=2)
    act = b.op("Mul", b.op("Mul", gate_part, b.op("Sigmoid", gate_part)), up)
    return b.op("Add", h, b.op("MatMul", act, b.weight(f"layers.{layer}.down_proj")))


def loop_carry(b: GraphBuilder, h: str) -> str:
    """n(h): FinalNorm(h) when plt_normalize_per_loop, else h."""
    return b.rms_norm(h, "norm") if b.cfg.plt_normalize_per_loop else h


def next_loop_input(b: GraphBuilder, embeddings: str, shifted_carry: str) -> str:
    """u^(r) = a * E + b * shifted n(h^(r-1))."""
    return b.op("Add", b.scaled(embeddings, b.cfg.emb_scale),
                b.scaled(shifted_carry, b.cfg.hidden_scale))


def lm_logits(b: GraphBuilder, h_last: str) -> str:
    """[B, d] -> fp32 logits [B, V]."""
    head = "embed_tokens" if b.cfg.tie_word_embeddings else "lm_head"
    logits = b.op("Gemm", b.rms_norm(h_last, "norm"), b.weight(head), transB=1)
    return logits if b.onnx_dtype == TensorProto.FLOAT else b.op("Cast", logits,
                                                                   to=TensorProto.FLOAT)


def kv_slot_indices(b: GraphBuilder, batch: str, slots: str, leading: list[str] | None = None):
    """ScatterND indices [*lead, B, G, T, k] addressing (lead..., b, g, slots[b, t]).

    `slots` [B, T] int64; `leading` are int64 index ranges [n] prepended (the ring's loop axis).
    """
    G = b.cfg.num_key_value_heads
    T = b.dim(slots, 1)
    lead = leading or []
    rank = len(lead) + 3
    shape = b.op("Concat", *[b.dim(x, 0) for x in lead], batch, b.ints(G), T, axis=0)
    axes = []
    for k, index in enumerate([*lead, b.arange(batch), b.arange(b.ints(G))]):
        axes.append(b.op("Reshape", index, b.ints(*[-1 if j == k else 1 for j in range(rank)])))
    axes.append(b.unsqueeze(slots, *range(len(lead)), len(lead) + 1))     # [.., B, 1, T]
    return b.op("Concat", *[b.unsqueeze(b.op("Expand", a, shape), -1) for a in axes], axis=-1)


def io_dims(cfg: PLTConfig, loops: int):
    G, D, W, d = cfg.num_key_value_heads, cfg.head_dim, cfg.window, cfg.hidden_size
    return {"global": ["batch", G, "capacity", D], "ring": [loops - 1, "batch", G, W, D],
            "carry": [loops - 1, "batch", d]}


def cache_io(b: GraphBuilder, has_carry: bool):
    """Declare the cache inputs; returns per-layer names."""
    dims = io_dims(b.cfg, b.loops)
    layers = []
    for i in range(b.cfg.num_hidden_layers):
        entry = {kv: b.input(f"past_key_values.{i}.{kv}", b.onnx_dtype, dims["global"])
                 for kv in ("key", "value")}
        if b.loops > 1:
            entry.update({f"ring_{kv}": b.input(f"past_ring.{i}.{kv}", b.onnx_dtype, dims["ring"])
                          for kv in ("key", "value")})
        layers.append(entry)
    carry = b.input("past_carry", b.onnx_dtype, dims["carry"]) if has_carry else None
    return layers, carry, dims


# ---- prefill / naive-step graph ---------------------------------------------------------
def build_prefill(b: GraphBuilder) -> onnx.ModelProto:
    cfg, L = b.cfg, b.loops
    has_carry = not cfg.is_v1 and L > 1
    ids = b.input("input_ids", TensorProto.INT64, ["batch", "chunk"])
    start = b.input("start", TensorProto.INT64, ["batch"])
    num_new = b.input("num_new", TensorProto.INT64, ["batch"])
    past, past_carry, dims = cache_io(b, has_carry)

    batch, T = b.dim(ids, 0), b.dim(ids, 1)
    steps = b.arange(T)                                                  # [T]
    positions = b.op("Add", b.unsqueeze(start, 1), b.unsqueeze(steps, 0))  # [B, T]
    cos, sin = rope_tables(b, positions)
    embeddings = b.op("Gather", b.weight("embed_tokens"), ids)           # [B, T, d]

    global_slots = kv_slot_indices(b, batch, positions)
    global_mask = causal_global_mask(b, past[0]["key"], positions)
    if L > 1:
        local_mask, ring_source = prefill_window(b, start, num_new, positions, steps, batch, T)

    global_kv = []
    h = embeddings
    last = b.op("Max", b.op("Sub", num_new, b.ints(1)), b.ints(0))   # last valid token
    new_carries = []
    present = [dict() for _ in range(cfg.num_hidden_layers)]
    for r in range(1, L + 1):
        for i in range(cfg.num_hidden_layers):
            if r == 1:
                def attention(heads, x_res, i=i):
                    kv = [b.op("ScatterND", past[i][n], global_slots, t, name=f"present.{i}.{n}")
                          for n, t in (("key", heads.k), ("value", heads.v))]
                    global_kv.append(kv)
                    return b.op("Attention", heads.q, *kv, global_mask)
            else:
                def attention(heads, x_res, i=i, r=r):
                    local_kv = []
                    for n, t in (("ring_key", heads.k), ("ring_value", heads.v)):
                        ring_old = b.op("Gather", past[i][n], b.const(r - 2, np.int64), axis=0)
                        window_kv = b.op("Concat", ring_old, t, axis=2)      # [B, G, W+T, D]
                        local_kv.append(window_kv)
                        present[i].setdefault(n, []).append(b.unsqueeze(
                            b.op("GatherElements", window_kv, ring_source, axis=2), 0))
                    g = gate(b, i, x_res, heads.q)
                    return gswa(b, heads.q, global_kv[i], global_mask, local_kv, local_mask, g)
            h = decoder_layer(b, i, h, cos, sin, attention)
        if r < L and not cfg.is_v1:
            shifted, carry = shift_chunk(b, h, past_carry, r, T, num_new, last)
            new_carries.append(b.unsqueeze(carry, 0))
            h = next_loop_input(b, embeddings, shifted)

    b.output(lm_logits(b, take_position(b, h, last)), "logits", TensorProto.FLOAT,
             ["batch", cfg.vocab_size])
    for i in range(cfg.num_hidden_layers):
        for kv, t in zip(("key", "value"), global_kv[i]):
            b.output(t, f"present.{i}.{kv}", b.onnx_dtype, dims["global"])
        for kv in ("key", "value") if L > 1 else ():
            b.output(b.op("Concat", *present[i][f"ring_{kv}"], axis=0), f"present_ring.{i}.{kv}",
                     b.onnx_dtype, dims["ring"])
    if has_carry:
        b.output(b.op("Concat", *new_carries, axis=0), "present_carry", b.onnx_dtype,
                 dims["carry"])
    return b.model("plt_prefill")


def shift_chunk(b: GraphBuilder, h: str, past_carry: str, r: int, T: str, num_new: str,
                last: str) -> tuple[str, str]:
    """CLP shift of loop r's output over a chunk: n(h) moved one token later, the chunk's first
    position taking the carry [B, T, d]; and the new carry, n(h) of the last valid token [B, d]
    (the old one for a sequence without tokens in this chunk)."""
    carry = loop_carry(b, h)                                                # [B, T, d]
    old = b.op("Gather", past_carry, b.const(r - 1, np.int64), axis=0)      # [B, d]
    head = b.op("Slice", carry, b.ints(0), b.op("Sub", T, b.ints(1)), b.ints(1))
    shifted = b.op("Concat", b.unsqueeze(old, 1), head, axis=1)
    has_tokens = b.unsqueeze(b.op("Greater", num_new, b.ints(0)), 1)
    return shifted, b.op("Where", has_tokens, take_position(b, carry, last), old)


def take_position(b: GraphBuilder, x: str, index: str) -> str:
    """x [B, T, d], index [B] -> x[b, index[b]] as [B, d]."""
    d = b.cfg.hidden_size
    idx = b.op("Expand", b.op("Reshape", index, b.ints(-1, 1, 1)),
               b.op("Concat", b.dim(x, 0), b.ints(1, d), axis=0))
    return b.op("Reshape", b.op("GatherElements", x, idx, axis=1), b.ints(-1, d))


def ring_positions(b: GraphBuilder, newest: str) -> str:
    """Position held by each ring slot j when `newest` [B] is the latest position written:
    newest - ((newest - j) mod W) -> [B, W] (negative: slot never written)."""
    W = b.cfg.window
    slots = b.const(np.arange(W, dtype=np.int64)[None, :])
    newest = b.unsqueeze(newest, 1)
    return b.op("Sub", newest, b.op("Mod", b.op("Sub", newest, slots), b.ints(W)))


def prefill_window(b: GraphBuilder, start, num_new, positions, steps, batch, T):
    """Local mask [B, 1, T, W + T] over [ring before the chunk ; chunk keys], and the
    GatherElements source [B, G, W, D] of the ring after the chunk in that concatenation."""
    W = b.cfg.window
    G, D = b.cfg.num_key_value_heads, b.cfg.head_dim
    held = ring_positions(b, b.op("Sub", start, b.ints(1)))                 # [B, W]
    held_q = b.unsqueeze(held, 1)                                           # [B, 1, W]
    distance = b.op("Sub", b.unsqueeze(positions, 2), held_q)              # [B, T, W]
    ring_visible = b.op("And", b.op("GreaterOrEqual", held_q, b.ints(0)),
                        b.op("Less", distance, b.ints(W)))
    chunk_distance = b.op("Sub", b.unsqueeze(steps, 1), b.unsqueeze(steps, 0))  # [T, T]
    chunk_visible = b.op("And", b.op("GreaterOrEqual", chunk_distance, b.ints(0)),
                         b.op("Less", chunk_distance, b.ints(W)))
    chunk_visible = b.op("Expand", chunk_visible, b.op("Concat", batch, T, T, axis=0))
    local_mask = b.unsqueeze(b.op("Concat", ring_visible, chunk_visible, axis=2), 1)

    newest = b.op("Sub", b.op("Add", start, num_new), b.ints(1))
    latest = ring_positions(b, newest)                                       # [B, W]
    from_chunk = b.op("GreaterOrEqual", latest, b.unsqueeze(start, 1))
    chunk_index = b.op("Add", b.op("Sub", latest, b.unsqueeze(start, 1)), b.ints(W))
    source = b.op("Where", from_chunk, chunk_index, b.const(np.arange(W, dtype=np.int64)))
    source = b.op("Expand", b.op("Reshape", source, b.ints(0, 1, W, 1)),
                  b.op("Concat", batch, b.ints(G, W, D), axis=0))
    return local_mask, source


def causal_global_mask(b: GraphBuilder, global_key: str, positions: str) -> str:
    """[B, 1, T, S]: global slot s visible to the query at positions[b, t] iff s <= it."""
    capacity_slots = b.arange(b.dim(global_key, 2))
    return b.op("LessOrEqual", b.op("Reshape", capacity_slots, b.ints(1, 1, 1, -1)),
                b.op("Reshape", positions, b.ints(0, 1, -1, 1)))


# ---- CLP decode step --------------------------------------------------------------------
def decode_window(b: GraphBuilder, newest: str) -> str:
    """Local mask [B, 1, R, R*W] over the R rings side by side, `newest` [B] the position
    just written: the row of loop r + 2 sees the written slots of its own ring r only."""
    R, W = b.loops - 1, b.cfg.window
    written = b.op("GreaterOrEqual", ring_positions(b, newest), b.ints(0))          # [B, W]
    written = b.op("Reshape", b.op("Tile", written, b.ints(1, R)), b.ints(-1, 1, 1, R * W))
    own_ring = np.zeros((1, 1, R, R * W), dtype=bool)
    for row in range(R):
        own_ring[..., row, row * W:(row + 1) * W] = True
    return b.op("And", written, b.const(own_ring))


def build_decode(b: GraphBuilder) -> onnx.ModelProto:
    cfg, L, W = b.cfg, b.loops, b.cfg.window
    R = L - 1
    ids = b.input("input_ids", TensorProto.INT64, ["batch"])
    start = b.input("start", TensorProto.INT64, ["batch"])
    past, past_carry, dims = cache_io(b, has_carry=True)

    batch = b.dim(ids, 0)
    embeddings = b.unsqueeze(b.op("Gather", b.weight("embed_tokens"), ids), 1)   # [B, 1, d]
    carry_rows = b.op("Transpose", past_carry, perm=[1, 0, 2])                    # [B, R, d]
    h = b.op("Concat", embeddings, next_loop_input(b, embeddings, carry_rows), axis=1)
    positions = b.op("Expand", b.unsqueeze(start, 1), b.op("Concat", batch, b.ints(L), axis=0))
    cos, sin = rope_tables(b, positions)

    start_col = b.unsqueeze(start, 1)                                               # [B, 1]
    global_slots = kv_slot_indices(b, batch, start_col)
    ring_slots = kv_slot_indices(b, batch, b.op("Mod", start_col, b.ints(W)),
                                 leading=[b.const(np.arange(R, dtype=np.int64))])
    ring_slots = b.op("Squeeze", ring_slots, b.ints(3))                             # [R, B, G, 4]
    local_mask = decode_window(b, start)

    def rows(x: str, first: int, last: int, axis: int) -> str:
        return b.op("Slice", x, b.ints(first), b.ints(last), b.ints(axis))

    global_mask = causal_global_mask(b, past[0]["key"], positions)                 # [B, 1, L, S]
    loop1_mask, later_mask = rows(global_mask, 0, 1, 2), rows(global_mask, 1, L, 2)

    for i in range(cfg.num_hidden_layers):
        def attention(heads, x_res, i=i):
            global_kv, local_kv = [], []
            for n, t in (("key", heads.k), ("value", heads.v)):
                global_kv.append(b.op("ScatterND", past[i][n], global_slots, rows(t, 0, 1, 2),
                                      name=f"present.{i}.{n}"))
                later = b.op("Transpose", rows(t, 1, L, 2), perm=[2, 0, 1, 3])       # [R, B, G, D]
                ring = b.op("ScatterND", past[i][f"ring_{n}"], ring_slots, later,
                            name=f"present_ring.{i}.{n}")
                local_kv.append(b.op("Reshape", b.op("Transpose", ring, perm=[1, 2, 0, 3, 4]),
                                     b.ints(0, 0, R * W, cfg.head_dim)))
            # loop 1's row: causal attention over the global cache; rows >= 2: G-SWA
            q_later = rows(heads.q, 1, L, 2)
            y_loop1 = b.op("Attention", rows(heads.q, 0, 1, 2), *global_kv, loop1_mask)
            y_later = gswa(b, q_later, global_kv, later_mask, local_kv, local_mask,
                           gate(b, i, rows(x_res, 1, L, 1), q_later))
            return b.op("Concat", y_loop1, y_later, axis=2)
        h = decoder_layer(b, i, h, cos, sin, attention)

    carries = loop_carry(b, b.op("Slice", h, b.ints(0), b.ints(R), b.ints(1)))     # [B, R, d]
    last_row = b.op("Gather", h, b.const(L - 1, np.int64), axis=1)                  # [B, d]
    b.output(lm_logits(b, last_row), "logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])
    for i in range(cfg.num_hidden_layers):
        for n in ("key", "value"):
            b.output(f"present.{i}.{n}", f"present.{i}.{n}", b.onnx_dtype, dims["global"])
            b.output(f"present_ring.{i}.{n}", f"present_ring.{i}.{n}", b.onnx_dtype, dims["ring"])
    b.output(b.op("Transpose", carries, perm=[1, 0, 2]), "present_carry", b.onnx_dtype,
             dims["carry"])
    return b.model("plt_decode_clp")
