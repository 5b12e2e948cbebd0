"""PLT models inside vLLM (SPEC sections 2-4): `iquestpltcoder` (v2) and `iquestloopcoder` (v1).

Registered by `runtimes.models.vllm_plugin`; vLLM imports this module only when it builds a model.

Caches, all owned by vLLM's KV cache manager:
- loop 1 of layer i: a full-attention `Attention` (the global K/V); loops r >= 2 read it
  query-only (`attn(q, None, None)`, no write) with loop 1's metadata;
- loop r >= 2 of layer i: its own sliding-window `Attention` of `window` keys;
- v2 only: the CLP carry n(h^(r)) of each request's last position, [L-1, d], in a state
  layer (`LoopCarry`, a `MambaBase`): vLLM allocates one slot per request and hands out its
  index in the short-conv state metadata, so the carry survives between engine steps
  without any change to vLLM's runner.

A step whose tokens are all decodes (one token per request) runs the L loop rows of v2 in one
pass through the stack (CLP, `plt_decode: "clp"`, the default): every linear reads its weights
once for L * tokens rows. The rows share their request's position, so every attention call of
a row block uses the step's own metadata unchanged; loop 1's row block runs first in each
layer and writes global slot t before the later rows read it. Prefill and mixed steps (and
`plt_decode: "naive"`) run the loops one after another with the one-token shift.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
)
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import (
    default_weight_loader,
    sharded_weight_loader,
)
from vllm.model_executor.models.interfaces import IsHybrid
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import maybe_prefix
from vllm.model_executor.utils import set_weight_attrs
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from plt_port.checkpoint import canonical_name
from plt_port.config import PLTConfig

DECODE_MODES = ("clp", "naive")
# HF names -> this module's parameters (q/k/v and gate/up are fused shards).
STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]


def plt_config(vllm_config: VllmConfig) -> PLTConfig:
    """The checkpoint's config (with the engine's overrides), checked by plt_port. Fields that
    transformers leaves unset (None) take PLTConfig's defaults; transformers versions move
    `rope_theta`/`rope_scaling` into `rope_parameters` or not, so both places are read."""
    data = {k: v for k, v in vllm_config.model_config.hf_config.to_dict().items() if v is not None}
    rope = data.pop("rope_parameters", None) or data.get("rope_scaling") or {}
    if "rope_theta" in rope:
        data.setdefault("rope_theta", rope["rope_theta"])
    plain = rope.get("rope_type", rope.get("type", "default")) == "default"
    data["rope_scaling"] = None if plain else rope
    return PLTConfig.from_dict(data)


def decode_mode(vllm_config: VllmConfig) -> str:
    mode = getattr(vllm_config.model_config.hf_config, "plt_decode", "clp")
    if mode not in DECODE_MODES:
        raise ValueError(f"plt_decode: expected one of {list(DECODE_MODES)}, got {mode!r}")
    return mode


def loop_prefix(prefix: str, layer: int, loop: int, num_layers: int) -> str:
    """A unique layer name per (loop, layer): vLLM keys each KV cache by the layer index in
    its name, so loop r of layer i is named as layer (r-1) * N + i."""
    return prefix.replace(f"layers.{layer}.", f"layers.{(loop - 1) * num_layers + layer}.")


class QueryGate(nn.Module):
    """gate_logit_h = <q_h, w_h> + b_h on the post-RoPE query; weight [H, D], split by head."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim))
        self.bias = nn.Parameter(torch.empty(num_heads))
        for param in (self.weight, self.bias):
            set_weight_attrs(param, {"weight_loader": sharded_weight_loader(0)})

    def forward(self, x_res: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """q [T, H, D] -> g [T, H]."""
        return torch.sigmoid(torch.einsum("thd,hd->th", q, self.weight) + self.bias)


class HiddenGate(nn.Module):
    """gate_logit = W_g RMSNorm_g(x_res) + b_g from the block input (LoopCoder-v2)."""

    def __init__(self, config: PLTConfig, prefix: str):
        super().__init__()
        self.proj = ColumnParallelLinear(config.hidden_size, config.num_attention_heads,
                                         bias=True, gather_output=False, prefix=f"{prefix}.proj")
        self.gate_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x_res: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(self.gate_norm(x_res))[0])


class PLTAttention(nn.Module):
    """q/k/v/o of one layer and its L attention caches (loop 1 global, loops >= 2 windowed)."""

    def __init__(self, config: PLTConfig, loops: int, layer: int, cache_config: CacheConfig,
                 quant_config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        H, G, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        if H % tp or (G % tp and tp % G):
            raise ValueError(f"tensor_parallel_size {tp} must divide the {H} attention heads "
                             f"and divide or be a multiple of the {G} KV heads")
        self.num_heads, self.num_kv_heads, self.head_dim = H // tp, max(1, G // tp), D
        self.q_size, self.kv_size = self.num_heads * D, self.num_kv_heads * D
        self.qkv_proj = QKVParallelLinear(config.hidden_size, D, H, G, bias=False,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(H * D, config.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(D, max_position=config.max_position_embeddings,
                                   rope_parameters={"rope_type": "default",
                                                    "rope_theta": config.rope_theta})
        window_cache = replace(cache_config, sliding_window=config.window)
        self.attn = nn.ModuleList(
            Attention(self.num_heads, D, D ** -0.5, num_kv_heads=self.num_kv_heads,
                      cache_config=cache_config if loop == 1 else window_cache,
                      quant_config=quant_config,
                      prefix=loop_prefix(f"{prefix}.attn", layer, loop, config.num_hidden_layers))
            for loop in range(1, loops + 1))
        if not config.is_v1:
            self.plt_gate = HiddenGate(config, f"{prefix}.plt_gate") if config.gate_uses_hidden \
                else QueryGate(self.num_heads, D)

    def forward(self, positions, x_norm, x_res, loops: list[int], gate) -> torch.Tensor:
        """Rows x [R * T, d] = row blocks of T tokens for `loops` (in that order, loop 1 first)."""
        qkv, _ = self.qkv_proj(x_norm)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        blocks = zip(loops, q.chunk(len(loops)), k.chunk(len(loops)), v.chunk(len(loops)),
                     x_res.chunk(len(loops)))
        outputs = [self.loop_attention(*block, gate) for block in blocks]
        return self.o_proj(torch.cat(outputs) if len(outputs) > 1 else outputs[0])[0]

    def loop_attention(self, loop, q, k, v, x_res, gate) -> torch.Tensor:
        if loop == 1:
            return self.attn[0](q, k, v)
        y_glob = self.attn[0](q, None, None)  # loop 1's cache, read only
        y_loc = self.attn[loop - 1](q, k, v)
        T = q.shape[0]
        g = gate(x_res, q.view(T, self.num_heads, self.head_dim))[..., None]
        y_glob, y_loc = (y.view(T, self.num_heads, self.head_dim) for y in (y_glob, y_loc))
        return (y_loc + g * (y_glob - y_loc)).reshape(T, -1)


class PLTDecoderLayer(nn.Module):
    def __init__(self, config: PLTConfig, loops: int, layer: int, cache_config, quant_config,
                 prefix: str):
        super().__init__()
        self.self_attn = PLTAttention(config, loops, layer, cache_config, quant_config,
                                      f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, "silu",
                            quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, h, loops: list[int], gate) -> torch.Tensor:
        h = h + self.self_attn(positions, self.input_layernorm(h), h, loops, gate)
        return h + self.mlp(self.post_attention_layernorm(h))


class LoopCarry(MambaBase):
    """Per-request state [L-1, d]: n(h^(r)) of the request's last processed position.

    Uses the short-conv state metadata (one state slot per request, decodes ordered before
    prefills); the state is never cached with a prefix."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, prefix: str):
        super().__init__()
        self.shape, self.dtype, self.prefix = shape, dtype, prefix
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]),)

    def get_state_shape(self):
        return (self.shape,)

    def get_state_dtype(self):
        return (self.dtype,)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.SHORT_CONV

    def requests(self, positions: torch.Tensor) -> StepRequests | None:
        """The requests of this step, or None in vLLM's profiling and warm-up runs."""
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:
            return None
        decodes = torch.arange(metadata.num_decodes, device=positions.device)
        starts, ends, slots = [decodes], [decodes], []
        if metadata.num_decodes:  # [decodes] or [decodes, 1 + speculative tokens], maybe padded
            decode_slots = metadata.state_indices_tensor_d
            decode_slots = decode_slots[:, 0] if decode_slots.dim() > 1 else decode_slots
            slots.append(decode_slots[:metadata.num_decodes])
        if metadata.num_prefills:
            bounds = metadata.query_start_loc_p.to(positions.device) + metadata.num_decode_tokens
            starts.append(bounds[:-1])
            ends.append(bounds[1:] - 1)
            slots.append(metadata.state_indices_tensor_p[:metadata.num_prefills])
        starts = torch.cat(starts)
        return StepRequests(starts, torch.cat(ends), torch.cat(slots).long(),
                            fresh=positions[starts] == 0,
                            only_decodes=metadata.num_prefills == 0
                            and metadata.num_decodes == positions.shape[0])

    def read(self, requests: StepRequests, loop: int) -> torch.Tensor:
        """Carry of loop `loop` for each request [R, d]; zero for a request at position 0."""
        carry = self.kv_cache[0][requests.slots, loop - 1]
        return carry.masked_fill(requests.fresh[:, None], 0)

    def write(self, requests: StepRequests, loop: int, carry: torch.Tensor) -> None:
        self.kv_cache[0][requests.slots, loop - 1] = carry.to(self.dtype)


@dataclass
class StepRequests:
    """Per request of an engine step: its first and last token in the step's flat batch, its
    carry slot, whether it starts at position 0; and whether every token is a decode."""

    starts: torch.Tensor
    ends: torch.Tensor
    slots: torch.Tensor
    fresh: torch.Tensor
    only_decodes: bool


class PLTModel(nn.Module):
    """embed_tokens, layers, norm (+ v1 gate_projections), the loop schedule and the carry."""

    def __init__(self, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        config = self.config = plt_config(vllm_config)
        self.loops = config.num_loops
        self.clp = decode_mode(vllm_config) == "clp" and not config.is_v1 and self.loops > 1
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            PLTDecoderLayer(config, self.loops, i, cache_config, quant_config,
                            f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.is_v1:
            tp = get_tensor_model_parallel_world_size()
            self.gate_projections = nn.ModuleList(
                QueryGate(config.num_attention_heads // tp, config.head_dim)
                for _ in range(config.num_hidden_layers))
        else:
            self.carry = LoopCarry(carry_shape(config), carry_dtype(vllm_config),
                                   f"{prefix}.layers.{self.loops * config.num_hidden_layers}.carry")

    def gate(self, layer: int):
        if self.config.is_v1:
            return self.gate_projections[layer]
        return self.layers[layer].self_attn.plt_gate

    def stack(self, positions, h, loops: list[int]) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(positions, h, loops, self.gate(i))
        return h

    def loop_carry(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) if self.config.plt_normalize_per_loop else h

    def next_loop_input(self, embeddings, shifted_carry) -> torch.Tensor:
        return self.config.emb_scale * embeddings + self.config.hidden_scale * shifted_carry

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        embeddings = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.is_v1:
            h = embeddings
            for loop in range(1, self.loops + 1):
                h = self.stack(positions, h, [loop])
            return self.norm(h)
        requests = self.carry.requests(positions) if self.loops > 1 else None
        if self.clp and requests is not None and requests.only_decodes:
            return self.norm(self.clp_decode(embeddings, positions, requests))
        return self.norm(self.loops_in_sequence(embeddings, positions, requests))

    def loops_in_sequence(self, embeddings, positions, requests) -> torch.Tensor:
        h = embeddings
        for loop in range(1, self.loops + 1):
            h = self.stack(positions, h, [loop])
            if loop == self.loops:
                return h
            carry = self.loop_carry(h)
            shifted = torch.cat([torch.zeros_like(carry[:1]), carry[:-1]])
            if requests is not None:  # each request's first token takes its carried state
                shifted[requests.starts] = self.carry.read(requests, loop)
                self.carry.write(requests, loop, carry[requests.ends])
            h = self.next_loop_input(embeddings, shifted)

    def clp_decode(self, embeddings, positions, requests) -> torch.Tensor:
        """One token per request: the L rows [E, aE + b carry_1, ...] in one pass."""
        rows = [embeddings] + [self.next_loop_input(embeddings, self.carry.read(requests, loop))
                               for loop in range(1, self.loops)]
        h = self.stack(positions.repeat(self.loops), torch.cat(rows),
                       list(range(1, self.loops + 1)))
        outputs = h.chunk(self.loops)
        for loop in range(1, self.loops):
            self.carry.write(requests, loop, self.loop_carry(outputs[loop - 1]))
        return outputs[-1]


def carry_shape(config: PLTConfig) -> tuple[int, int]:
    """[L-1, d]; one unused row at L = 1 (vLLM has no empty states)."""
    return max(config.num_loops - 1, 1), config.hidden_size


def carry_dtype(vllm_config: VllmConfig) -> torch.dtype:
    """The model's dtype unless `--mamba-cache-dtype` says otherwise."""
    return MambaStateDtypeCalculator.short_conv_state_dtype(
        vllm_config.model_config.dtype, vllm_config.cache_config.mamba_cache_dtype)[0]


class PLTForCausalLM(nn.Module):
    """Shared by both formats; vLLM instantiates the two subclasses below."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.model = PLTModel(vllm_config, maybe_prefix(prefix, "model"))
        config = self.model.config
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for hf_name, tensor in weights:
            if self.model.config.tie_word_embeddings and hf_name == "lm_head.weight":
                continue
            name, shard = parameter_name(canonical_name(hf_name), self.model.config)
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in this model")
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(name)
        return loaded


def parameter_name(name: str, config: PLTConfig) -> tuple[str, str | int | None]:
    """(this module's parameter, shard id) for a canonical HF tensor name."""
    for fused, part, shard in STACKED:
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard
    if config.gate_uses_hidden and ".plt_gate." in name and ".gate_norm." not in name:
        return name.replace(".plt_gate.", ".plt_gate.proj."), None
    return name, None


class IQuestPLTCoderForCausalLM(PLTForCausalLM, IsHybrid):
    """LoopCoder-v2 (`iquestpltcoder`): hybrid in vLLM's sense, for the carry state."""

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return (carry_shape(plt_config(vllm_config)),)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return (carry_dtype(vllm_config),)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.short_conv_state_copy_func()


class IQuestLoopCoderForCausalLM(PLTForCausalLM):
    """LoopCoder v1 (`iquestloopcoder`), any loop count: no shift, no carry."""
