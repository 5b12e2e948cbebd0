"""Reference model vs independent computations: HF Llama (L = 1) and a per-position numpy
re-implementation of SPEC sections 2-3 written from the spec, not from plt_port/model.py."""

import math

import numpy as np
import pytest
import torch

from conftest import requires, tiny_config
from plt_port.checkpoint import load_tensors
from plt_port.config import ConfigError
from plt_port.model import PLTForCausalLM
from plt_port.random_model import random_tensors


def build(fmt="plt", seed=0, **overrides):
    config = tiny_config(fmt, **overrides)
    return PLTForCausalLM.from_tensors(config, random_tensors(config, seed)).eval()


# ---- an independent numpy reference, one position at a time ---------------------------
def np_rmsnorm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def np_rope(x, pos, theta):
    half = x.shape[-1] // 2
    freqs = pos / theta ** (np.arange(half) * 2 / x.shape[-1])
    cos, sin = np.cos(freqs), np.sin(freqs)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_attend(q, keys, values):
    """q [H, D]; keys/values: lists of [G, D] for the visible positions."""
    K, V = np.stack(keys, 1), np.stack(values, 1)        # [G, n, D]
    H, G = q.shape[0], K.shape[0]
    K, V = np.repeat(K, H // G, 0), np.repeat(V, H // G, 0)
    s = np.einsum("hd,hnd->hn", q, K) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hn,hnd->hd", p, V)


def np_plt_forward(cfg, w, ids, loops):
    """Logits [T, V] for one sequence, straight from SPEC sections 2 and 3."""
    d, H, G, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps, T = cfg.rms_norm_eps, len(ids)
    left = cfg.loop_window_size - 1 if cfg.is_v1 else cfg.plt_window_size[0]
    E = w["model.embed_tokens.weight"][ids].astype(np.float64)
    norm = lambda x: np_rmsnorm(x, w["model.norm.weight"], eps)  # noqa: E731
    loop1_kv = {}
    h_prev = None
    for r in range(1, loops + 1):
        if r == 1:
            x = E.copy()
        elif cfg.is_v1:
            x = h_prev.copy()
        else:
            n_prev = norm(h_prev) if cfg.plt_normalize_per_loop else h_prev
            shifted = np.vstack([np.zeros((1, d)), n_prev[:-1]])
            x = cfg.emb_scale * E + cfg.hidden_scale * shifted
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            xn = np_rmsnorm(x, w[p + "input_layernorm.weight"], eps)
            q = np.stack([np_rope((xn[t] @ w[p + "self_attn.q_proj.weight"].T).reshape(H, D), t,
                                  cfg.rope_theta) for t in range(T)])
            k = np.stack([np_rope((xn[t] @ w[p + "self_attn.k_proj.weight"].T).reshape(G, D), t,
                                  cfg.rope_theta) for t in range(T)])
            v = (xn @ w[p + "self_attn.v_proj.weight"].T).reshape(T, G, D)
            if r == 1:
                loop1_kv[i] = (k, v)
            y = np.zeros((T, H, D))
            for t in range(T):
                K1, V1 = loop1_kv[i]
                y_glob = np_attend(q[t], list(K1[:t + 1]), list(V1[:t + 1]))
                if r == 1:
                    y[t] = y_glob
                    continue
                lo = max(0, t - left)
                y_loc = np_attend(q[t], list(k[lo:t + 1]), list(v[lo:t + 1]))
                if cfg.is_v1:
                    gw, gb = w[f"model.gate_projections.{i}.weight"], w[f"model.gate_projections.{i}.bias"]
                    logit = np.einsum("hd,hd->h", q[t], gw) + gb
                elif cfg.plt_gate_use_hidden_states:
                    gn = np_rmsnorm(x[t], w[p + "self_attn.plt_gate.gate_norm.weight"], eps)
                    logit = w[p + "self_attn.plt_gate.weight"] @ gn + w[p + "self_attn.plt_gate.bias"]
                else:
                    logit = np.einsum("hd,hd->h", q[t], w[p + "self_attn.plt_gate.weight"]) \
                        + w[p + "self_attn.plt_gate.bias"]
                g = 1 / (1 + np.exp(-logit))
                y[t] = g[:, None] * y_glob + (1 - g[:, None]) * y_loc
            x = x + y.reshape(T, H * D) @ w[p + "self_attn.o_proj.weight"].T
            xn = np_rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
            gate = xn @ w[p + "mlp.gate_proj.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (xn @ w[p + "mlp.up_proj.weight"].T)) \
                @ w[p + "mlp.down_proj.weight"].T
        h_prev = x
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return norm(h_prev) @ head.T


CASES = [
    ("plt", {}),                                                     # hidden-state gate, window [7,0]
    ("plt", dict(plt_gate_use_hidden_states=False, plt_normalize_per_loop=False,
                 plt_emb_scale=0.5, plt_hidden_scale=2.0, tie_word_embeddings=True)),
    ("plt", dict(num_key_value_heads=4, plt_window_size=[0, 0])),    # MHA, window of 1 key
    ("v1", {}),                                                      # query gate, 8 keys
]


@pytest.mark.parametrize("fmt,overrides", CASES)
@pytest.mark.parametrize("loops", [1, 2, 3])
def test_matches_independent_numpy_reference(fmt, overrides, loops):
    config = tiny_config(fmt, **overrides)
    weights = random_tensors(config, seed=3)
    model = PLTForCausalLM.from_tensors(config, weights).eval()
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=20)  # 20 > window
    with torch.no_grad():
        ours = model(torch.from_numpy(ids)[None], loops=loops)[0].numpy()
    ref = np_plt_forward(config, {k: v.astype(np.float64) for k, v in weights.items()}, ids, loops)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


@requires("transformers")
@pytest.mark.parametrize("tied", [False, True])
def test_one_loop_equals_plain_llama(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_config("plt", tie_word_embeddings=tied, rope_theta=10000.0)
    weights = random_tensors(config, seed=1)
    ours = PLTForCausalLM.from_tensors(config, weights).eval()
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, head_dim=config.head_dim,
        num_key_value_heads=config.num_key_value_heads, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
        tie_word_embeddings=tied, attention_bias=False, mlp_bias=False)).eval()
    state = {k: torch.from_numpy(v) for k, v in weights.items() if "plt_gate" not in k}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids, loops=1) - llama(ids).logits).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("fmt,window", [("plt", 8), ("v1", 8)])
def test_window_counts_keys_including_the_query(fmt, window):
    overrides = {"plt_window_size": [window - 1, 0]} if fmt == "plt" else {"loop_window_size": window}
    model = build(fmt, **overrides)
    assert model.config.window == window
    ids = torch.randint(0, 512, (1, 3 * window))
    with torch.no_grad():
        logits, trace = model(ids, loops=2, return_trace=True)
        assert torch.allclose(logits, model(ids, loops=2), atol=1e-5)  # SDPA path, same masks
    probs = trace.attn_local[1][0][0, 0]                              # loop 2, layer 0, head 0
    visible = (probs > 0).sum(-1)
    expected = torch.clamp(torch.arange(1, 3 * window + 1), max=window)
    assert torch.equal(visible, expected)
    t = 3 * window - 1
    assert probs[t, t - window] == 0 and probs[t, t - window + 1] > 0


def test_the_shift_between_loops():
    model = build("plt")
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    t = 9
    changed[0, t] = (ids[0, t] + 1) % 512
    with torch.no_grad():
        _, a = model(ids, loops=3, return_trace=True)
        _, b = model(changed, loops=3, return_trace=True)
    for r in (1, 2):  # loop inputs of loops 2 and 3
        diff = (a.loop_inputs[r] - b.loop_inputs[r]).abs().amax(-1)[0]
        assert torch.all(diff[:t] == 0)
        # position t changes only through its own embedding; t + 1 through the shifted output
        assert diff[t] > 0 and diff[t + 1] > 0
        no_embedding = (a.loop_inputs[r][0, t] - model.config.emb_scale * a.embeddings[0, t]) - \
                       (b.loop_inputs[r][0, t] - model.config.emb_scale * b.embeddings[0, t])
        assert no_embedding.abs().max() < 1e-6  # float rounding of the subtraction only
    first = model(ids[:, :1], loops=2, return_trace=True)[1]
    assert torch.equal(first.loop_inputs[1], first.embeddings)  # zero shifted term at t = 0


def test_v1_has_no_shift():
    model = build("v1")
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        _, trace = model(ids, loops=3, return_trace=True)
    assert torch.equal(trace.loop_inputs[1], trace.hidden[0])
    assert torch.equal(trace.loop_inputs[2], trace.hidden[1])


def test_trace_shapes_and_gates():
    model = build("plt", plt_num_loops=3)
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        _, trace = model(ids, return_trace=True)
    assert len(trace.hidden) == 3 and trace.hidden[0].shape == (2, 12, 64)
    assert trace.gates[0] == [None, None]
    gate = trace.gates[1][1]
    assert gate.shape == (2, 4, 12) and 0 < gate.min() and gate.max() < 1 and gate.std() > 0.01
    assert torch.allclose(trace.attn_global[2][0].sum(-1), torch.ones(2, 4, 12))


@pytest.mark.parametrize("loops", [0, 9, 2.0, True])
def test_loop_count_out_of_range(loops):
    with pytest.raises(ConfigError, match="loops"):
        build("plt")(torch.zeros(1, 3, dtype=torch.long), loops=loops)


def test_trains_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build("plt")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 512, (4, 17))
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1], loops=2)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    gate_grad = model.model.layers[0].self_attn.plt_gate.weight.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "m")
    loaded = PLTForCausalLM.from_pretrained(tmp_path / "m")
    for name, array in load_tensors(tmp_path / "m").items():
        assert np.array_equal(array, model.state_dict()[name].detach().numpy())
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))


def test_init_weights_follow_the_documented_scales():
    """N(0, std) matrices, output projections at std / sqrt(2 * layers), unit norms, zero
    gate biases (Llama-style init of `PLTForCausalLM.init_weights`)."""
    config = tiny_config("plt", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=512)
    model = PLTForCausalLM(config)
    model.init_weights(std=0.02, seed=0)
    layer = model.model.layers[0]
    for weight, expected in [(layer.self_attn.q_proj.weight, 0.02),
                             (layer.self_attn.o_proj.weight, 0.02 / math.sqrt(8)),
                             (layer.mlp.down_proj.weight, 0.02 / math.sqrt(8))]:
        assert float(weight.detach().std()) == pytest.approx(expected, rel=0.05)
    assert torch.all(layer.input_layernorm.weight == 1)
    assert torch.all(model.gate(0).bias == 0)
