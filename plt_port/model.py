"""Reference PyTorch Parallel Loop Transformer (SPEC sections 2 and 3).

Architecture:
- one stack of N pre-norm Llama blocks (RMSNorm, GQA attention with HF-style RoPE,
  SwiGLU MLP) run L times ("loops") with shared weights; RoPE positions are the same
  absolute positions in every loop;
- loop 1 is ordinary causal attention; its post-RoPE K/V of layer l are the global KV;
- loop r >= 2 uses gated sliding-window attention (G-SWA): a causal branch over loop 1's
  K/V of the same layer and a local branch over its own K/V inside a window of `window`
  keys (query included), mixed per (token, head) by g = sigmoid(gate_logit):
  y = g * y_glob + (1 - g) * y_loc;
- PLT (`iquestpltcoder`): loop r >= 2 input is a * E_t + b * n(h^(r-1)_{t-1}) (a one-token
  shift, zero at position 0), n = FinalNorm when `plt_normalize_per_loop`; gate from
  RMSNorm_g(block input) ([H, d]) or from the post-RoPE query ([H, D]);
- v1 (`iquestloopcoder`): loop r >= 2 input is loop r-1's output at the same position,
  query-form gate stored as `model.gate_projections.{i}`;
- logits = LMHead(FinalNorm(h^(L))); with L = 1 this is a plain Llama decoder.

This module is both the training model and the reference every backend is checked against.
Its pieces (`DecoderLayer`, `rope_cos_sin`, `gated_swa`, ...) are reused by the cached
PyTorch runtime, which only changes where K/V come from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .config import PLTConfig
from .errors import PLTError


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_dtype(stored: str, device: str = "cpu") -> str:
    """The precision a checkpoint stored in `stored` runs in when none is asked for: the stored
    one, except float16 on the CPU runs in float32 (torch's CPU fp16 matmuls are 2-5x slower
    than fp32 ones; bf16 ones are as fast as fp32)."""
    if stored not in TORCH_DTYPES:
        raise PLTError(f"precision must be one of {', '.join(TORCH_DTYPES)}, got {stored!r}")
    return "float32" if stored == "float16" and device == "cpu" else stored


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a torch tensor over the same memory (bf16 arrives as ml_dtypes')."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of HF Llama RoPE for integer `positions` [..., T] -> [..., T, head_dim] (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [T, D] or [B, T, D] (rotate-half convention)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attend(q, k, v, mask, return_probs: bool = False):
    """Softmax attention with GQA; q [B, H, Tq, D], k/v [B, G, Tk, D], mask bool [.., Tq, Tk].

    Rows whose mask is all False (only padding) give zeros, not NaN.
    """
    groups = q.shape[1] // k.shape[1]
    if not return_probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1), None
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v.float()).to(q.dtype), probs


def gated_swa(q, global_kv, global_mask, local_kv, local_mask, gate, return_probs=False):
    """G-SWA: gate * attn(q, loop-1 K/V) + (1 - gate) * attn(q, own K/V in window).

    gate [B, H, Tq] in (0, 1); returns y [B, H, Tq, D] and (global, local) probs if asked.
    """
    y_glob, p_glob = attend(q, *global_kv, global_mask, return_probs)
    y_loc, p_loc = attend(q, *local_kv, local_mask, return_probs)
    return gate_mix(y_glob, y_loc, gate), (p_glob, p_loc)


def gate_mix(y_glob, y_loc, gate):
    """gate * y_glob + (1 - gate) * y_loc, gate [B, H, Tq] the global branch's share."""
    g = gate[..., None].to(y_glob.dtype)
    return g * y_glob + (1 - g) * y_loc


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None):
    """Bool mask [.., Tq, Tk]: key s visible to query t iff s <= t (and t - s < window)."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


class PLTGate(nn.Module):
    """gate_logit per (token, head): hidden form W_g RMSNorm_g(x_res) + b, or query form <q_h, w_h> + b_h."""

    def __init__(self, config: PLTConfig, hidden_form: bool):
        super().__init__()
        H = config.num_attention_heads
        in_dim = config.hidden_size if hidden_form else config.head_dim
        self.hidden_form = hidden_form
        self.weight = nn.Parameter(torch.zeros(H, in_dim))
        self.bias = nn.Parameter(torch.zeros(H))
        if hidden_form:
            self.gate_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x_res: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """x_res [B, T, d] (block input), q [B, H, T, D] (post-RoPE) -> g [B, H, T]."""
        if self.hidden_form:
            logit = F.linear(self.gate_norm(x_res), self.weight, self.bias).transpose(1, 2)
        else:
            logit = torch.einsum("bhtd,hd->bht", q, self.weight) + self.bias[:, None]
        return torch.sigmoid(logit)


class Attention(nn.Module):
    def __init__(self, config: PLTConfig):
        super().__init__()
        d, H, G, D = (config.hidden_size, config.num_attention_heads,
                      config.num_key_value_heads, config.head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, D
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, G * D, bias=False)
        self.v_proj = nn.Linear(d, G * D, bias=False)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        if not config.is_v1:
            self.plt_gate = PLTGate(config, hidden_form=config.gate_uses_hidden)

    def project(self, x: torch.Tensor, cos, sin):
        """x [B, T, d] -> post-RoPE q [B, H, T, D], k and v [B, G, T, D]."""
        return rope_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.head_dim, cos, sin)


def rope_heads(q, k, v, head_dim: int, cos, sin):
    """Projected q [B, T, H * D], k and v [B, T, G * D] -> post-RoPE q [B, H, T, D], k and v
    [B, G, T, D]."""
    B, T, _ = q.shape
    q, k, v = (x.view(B, T, -1, head_dim).transpose(1, 2) for x in (q, k, v))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, config: PLTConfig):
        super().__init__()
        d, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: PLTConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos, sin, attention) -> torch.Tensor:
        """One block; `attention(q, k, v, x_res) -> y [B, H, T, D]` decides where K/V come from."""
        q, k, v = self.self_attn.project(self.input_layernorm(h), cos, sin)
        y = attention(q, k, v, h)
        B, H, T, D = y.shape
        h = h + self.self_attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
        return h + self.mlp(self.post_attention_layernorm(h))


class PLTModel(nn.Module):
    """HF-style inner model: `embed_tokens`, `layers`, `norm` (+ v1 `gate_projections`)."""

    def __init__(self, config: PLTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_v1:
            self.gate_projections = nn.ModuleList(
                PLTGate(config, hidden_form=False) for _ in range(config.num_hidden_layers))


@dataclass
class LoopTrace:
    """Per-loop internals of one forward, for diagnostics (index r-1 = loop r)."""

    embeddings: torch.Tensor
    loop_inputs: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)          # h^(r), [B, T, d]
    attn_global: list[list[torch.Tensor]] = field(default_factory=list)  # [B, H, T, T] per layer
    attn_local: list[list[torch.Tensor | None]] = field(default_factory=list)
    gates: list[list[torch.Tensor | None]] = field(default_factory=list)  # [B, H, T] per layer


class PLTForCausalLM(nn.Module):
    def __init__(self, config: PLTConfig):
        super().__init__()
        self.config = config
        self.model = PLTModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()

    # ---- pieces shared with the cached runtime -----------------------------------------
    def gate(self, layer_idx: int) -> PLTGate:
        if self.config.is_v1:
            return self.model.gate_projections[layer_idx]
        return self.model.layers[layer_idx].self_attn.plt_gate

    def lm_logits(self, h_last: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h_last)
        if self.config.tie_word_embeddings:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    def loop_carry(self, h: torch.Tensor) -> torch.Tensor:
        """n(h): what a loop's output contributes to the next loop's (shifted) input."""
        return self.model.norm(h) if self.config.plt_normalize_per_loop else h

    def next_loop_input(self, embeddings: torch.Tensor, shifted_carry: torch.Tensor):
        """u^(r) = a * E + b * n(h^(r-1)) shifted by one token (PLT only)."""
        return self.config.emb_scale * embeddings + self.config.hidden_scale * shifted_carry

    def rope(self, positions: torch.Tensor):
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

    # ---- full-sequence forward ---------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, loops: int | None = None,
                return_trace: bool = False):
        """Logits [B, T, V] of loop L for every position; with `return_trace`, also a LoopTrace.

        `loops` overrides the checkpoint's loop count (any value in 1..8).
        """
        cfg = self.config
        loops = cfg.resolve_loops(loops)
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)
        cos, sin = self.rope(positions)
        full_mask = causal_mask(positions, positions)
        window_mask = causal_mask(positions, positions, cfg.window)
        embeddings = self.model.embed_tokens(input_ids)
        trace = LoopTrace(embeddings) if return_trace else None

        global_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        h = embeddings
        for r in range(1, loops + 1):
            loop_input = h
            probs_glob, probs_loc, gates = [], [], []
            for i, layer in enumerate(self.model.layers):
                if r == 1:
                    def attention(q, k, v, x_res):
                        global_kv.append((k, v))
                        y, p = attend(q, k, v, full_mask, return_trace)
                        probs_glob.append(p)
                        probs_loc.append(None)
                        gates.append(None)
                        return y
                else:
                    def attention(q, k, v, x_res, i=i):
                        g = self.gate(i)(x_res, q)
                        y, (pg, pl) = gated_swa(q, global_kv[i], full_mask, (k, v), window_mask,
                                                g, return_trace)
                        probs_glob.append(pg)
                        probs_loc.append(pl)
                        gates.append(g)
                        return y
                h = layer(h, cos, sin, attention)
            if trace is not None:
                trace.loop_inputs.append(loop_input)
                trace.hidden.append(h)
                trace.attn_global.append(probs_glob)
                trace.attn_local.append(probs_loc)
                trace.gates.append(gates)
            if r < loops and not cfg.is_v1:
                carry = self.loop_carry(h)
                shifted = torch.cat([torch.zeros_like(carry[:, :1]), carry[:, :-1]], dim=1)
                h = self.next_loop_input(embeddings, shifted)
        logits = self.lm_logits(h)
        return (logits, trace) if return_trace else logits

    # ---- weights -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Llama-style init: N(0, std) matrices (output projections scaled by depth),
        unit norms, gate bias 0 and small gate weights (g starts near 0.5)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                scale = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * scale)

    def tensors(self, dtype=np.float32) -> dict[str, np.ndarray]:
        """State as numpy arrays under HF names (tied head omitted)."""
        return {k: v.detach().cpu().float().numpy().astype(dtype)
                for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, config: PLTConfig, tensors: Mapping[str, np.ndarray],
                     dtype: torch.dtype = torch.float32) -> "PLTForCausalLM":
        """The model over `tensors`, each converted once to `dtype` (no copy when it is in
        `dtype` already); the modules are built on the meta device, so no memory is spent
        on initial weights."""
        with torch.device("meta"):
            model = cls.__new__(cls)
            nn.Module.__init__(model)
            model.config = config
            model.model = PLTModel(config)
            if not config.tie_word_embeddings:
                model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        state = {name: to_torch(array).to(dtype) for name, array in tensors.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, dtype: str | None = None,
                        config: PLTConfig | None = None) -> "PLTForCausalLM":
        """`dtype` None: the checkpoint's stored precision (see `run_dtype`, on the CPU)."""
        config = config or PLTConfig.from_file(model_dir)
        dtype = dtype or run_dtype(config.torch_dtype)
        if dtype not in TORCH_DTYPES:
            raise PLTError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
        tensors = checkpoint.open_tensors(model_dir, config, checkpoint.numpy_dtype(dtype))
        return cls.from_tensors(config, tensors, TORCH_DTYPES[dtype]).eval()

    def save_pretrained(self, out_dir: str | os.PathLike, dtype=np.float32,
                        tokenizer_dir: str | None = None, max_shard_bytes: int | None = None):
        config = self.config.replace(torch_dtype=np.dtype(dtype).name)
        checkpoint.save_model_dir(out_dir, config, self.tensors(dtype), tokenizer_dir,
                                  max_shard_bytes)

    def check_token_ids(self, token_ids) -> None:
        """Ids from a tokenizer must fit this model's embedding table."""
        top = int(token_ids.max())  # numpy array or torch tensor
        if top >= self.config.vocab_size:
            raise PLTError(f"token id {top} is outside the model's vocabulary "
                           f"({self.config.vocab_size}): the tokenizer and the model do not match")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
