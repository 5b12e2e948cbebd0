"""Loop diagnostics: each metric on constructed inputs with known answers, and the per-loop
numbers of a tiny model against independent numpy computations and separate model runs."""

from __future__ import annotations

import json
import math
import os
import sysconfig

import numpy as np
import pytest
import torch

from plt_port import checkpoint, diagnostics
from plt_port.app.cli import main
from plt_port.config import ConfigError, PLTConfig
from plt_port.model import PLTForCausalLM
from plt_port.tokenizer import Tokenizer
from conftest import requires

TEXT = open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py"), encoding="utf-8").read()
SMALL = dict(seq_len=32, batch_size=2, max_tokens=96, progress=False)


# ---- metrics on constructed inputs -------------------------------------------------------

def test_identical_loops_give_zero_step_and_zero_kl():
    h = torch.randn(2, 5, 8)
    assert diagnostics.step_size(h, h.clone()) == 0.0
    logits = torch.randn(2, 5, 11) * 3
    assert diagnostics.kl_divergence(logits, logits.clone()) == pytest.approx(0.0, abs=1e-7)
    # a constant logit offset is the same distribution
    assert diagnostics.kl_divergence(logits + 4.0, logits) == pytest.approx(0.0, abs=1e-6)


def test_step_size_and_kl_known_values():
    h_prev = torch.randn(3, 4, 16)
    assert diagnostics.step_size(1.5 * h_prev, h_prev) == pytest.approx(0.5, rel=1e-6)
    p, q = [0.5, 0.5], [0.9, 0.1]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    logits = torch.tensor([p]).log()
    assert diagnostics.kl_divergence(logits, torch.tensor([q]).log()) == pytest.approx(expected,
                                                                                        rel=1e-6)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank_of_rank_k_matrix_is_at_most_k(k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(200, k, generator=gen) @ torch.randn(k, 32, generator=gen)
    rank = diagnostics.effective_rank(x)
    assert 1.0 <= rank <= k + 1e-9
    # k equal singular values: exactly k
    u, _ = torch.linalg.qr(torch.randn(200, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, k, generator=gen, dtype=torch.float64))
    flat = (3.0 * u @ v.T).float()
    assert diagnostics.effective_rank(flat) == pytest.approx(k, rel=1e-5)
    assert diagnostics.effective_rank(flat) <= k + 1e-9


def test_effective_rank_matches_svd_and_accumulates_over_batches():
    x = torch.randn(2, 50, 16) * torch.linspace(0.1, 3.0, 16)
    s = np.linalg.svd(x.reshape(-1, 16).double().numpy(), compute_uv=False)
    p = s / s.sum()
    expected = math.exp(-(p * np.log(p)).sum())
    assert diagnostics.effective_rank(x) == pytest.approx(expected, rel=1e-6)
    split_gram = diagnostics.gram(x[0]) + diagnostics.gram(x[1])
    assert diagnostics.effective_rank_from_gram(split_gram, 100) == pytest.approx(expected, rel=1e-6)
    assert diagnostics.effective_rank(torch.zeros(4, 3)) == 0.0


def test_update_alignment_orthogonal_reversed_same():
    h0 = torch.zeros(1, 4, 2)
    h1 = h0 + torch.tensor([1.0, 0.0])
    assert diagnostics.update_alignment(h1 + torch.tensor([0.0, 2.0]), h1, h0) == pytest.approx(0.0)
    assert diagnostics.update_alignment(h1 - torch.tensor([3.0, 0.0]), h1, h0) == pytest.approx(-1.0)
    assert diagnostics.update_alignment(h1 + torch.tensor([0.5, 0.0]), h1, h0) == pytest.approx(1.0)
    # a token whose update is zero has no direction: left out, not counted as 0
    h2 = h1 - torch.tensor([3.0, 0.0])
    h2[:, 0] = h1[:, 0]
    assert diagnostics.update_alignment(h2, h1, h0) == pytest.approx(-1.0)


def test_attention_entropy_and_change():
    n = 6
    uniform = torch.full((2, 3, n, n), 1.0 / n)
    assert diagnostics.attention_entropy(uniform) == pytest.approx(math.log(n), rel=1e-6)
    one_hot = torch.eye(n).expand(2, 3, n, n)
    assert diagnostics.attention_entropy(one_hot) == 0.0
    assert diagnostics.attention_change(uniform, uniform.clone()) == 0.0
    shifted = one_hot.roll(1, dims=-1)
    assert diagnostics.attention_change(one_hot, shifted) == pytest.approx(1.0)
    assert diagnostics.attention_change(one_hot, uniform) == pytest.approx(1 - 1 / n, rel=1e-6)


def test_gate_mean_and_offset_cost():
    assert diagnostics.gate_mean(torch.full((2, 4, 9), 0.7)) == pytest.approx(0.7, rel=1e-6)
    constant = torch.randn(1, 1, 8).expand(3, 10, 8)
    assert diagnostics.offset_cost(constant) == 0.0
    step = torch.randn(8)
    ramp = torch.arange(10.0)[None, :, None] * step  # c_t - c_{t-1} = step
    assert diagnostics.offset_cost(ramp) == pytest.approx(step.norm().item(), rel=1e-5)


def test_loops_argument():
    assert diagnostics.parse_loops("1..4") == 4
    assert diagnostics.parse_loops("3") == 3
    assert diagnostics.parse_loops(None) is None
    for bad in ("2..4", "x", "1..y"):
        with pytest.raises(diagnostics.DiagnosticsError, match="--loops"):
            diagnostics.parse_loops(bad)
    with pytest.raises(ConfigError, match="loops"):
        PLTConfig().resolve_loops(diagnostics.parse_loops("1..9"))


# ---- a tiny model against independent computations ---------------------------------------

def _windows(model_dir):
    return diagnostics.text_windows(Tokenizer.from_dir(model_dir), TEXT, SMALL["seq_len"],
                                    SMALL["max_tokens"])


def _np_step(h, h_prev):
    return float(np.mean(np.linalg.norm(h - h_prev, axis=-1) / np.linalg.norm(h_prev, axis=-1)))


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(logits, logits_prev):
    logp, logq = _np_log_softmax(logits), _np_log_softmax(logits_prev)
    return float(np.mean((np.exp(logp) * (logp - logq)).sum(-1)))


def _np_cos(a, b):
    """Mean cosine over tokens where both vectors are nonzero."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    defined = norms > 0
    return float(np.mean((a * b).sum(-1)[defined] / norms[defined]))


def _np_effective_rank(h):
    s = np.linalg.svd(h.reshape(-1, h.shape[-1]).astype(np.float64), compute_uv=False)
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_per_loop_metrics_match_independent_numpy(make_model):
    model_dir = make_model()
    loops = 3
    result = diagnostics.diagnose(model_dir, loops, TEXT, **SMALL)
    ids = _windows(model_dir)
    model = PLTForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        _, trace = model(ids, loops=loops, return_trace=True)
        lens = [model.lm_logits(h).numpy() for h in [trace.embeddings, *trace.hidden]]
        carries = [model.loop_carry(h).numpy() for h in trace.hidden]
    h = [trace.embeddings.numpy()] + [x.numpy() for x in trace.hidden]
    per_loop = result["per_loop"]
    for r in range(1, loops + 1):
        assert per_loop["step_size"][r - 1] == pytest.approx(_np_step(h[r], h[r - 1]), rel=1e-5)
        assert per_loop["kl_shift"][r - 1] == pytest.approx(_np_kl(lens[r], lens[r - 1]), rel=1e-4)
        assert per_loop["effective_rank"][r - 1] == pytest.approx(_np_effective_rank(h[r]), rel=1e-5)
    for r in range(2, loops + 1):
        assert per_loop["alignment"][r - 1] == pytest.approx(
            _np_cos(h[r] - h[r - 1], h[r - 1] - h[r - 2]), rel=1e-5, abs=1e-6)
        carry = carries[r - 2]
        assert per_loop["offset_cost"][r - 1] == pytest.approx(
            float(np.linalg.norm(carry[:, 1:] - carry[:, :-1], axis=-1).mean()), rel=1e-5)
        gates = [g.numpy().mean() for g in trace.gates[r - 1]]
        assert per_loop["gate_mean"][r - 1] == pytest.approx(float(np.mean(gates)), rel=1e-5)
    p = trace.attn_global[0][1].numpy()
    entropy = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1).mean()
    assert result["per_layer"]["attn_entropy_global"][0][1] == pytest.approx(float(entropy), rel=1e-5)
    assert per_loop["alignment"][0] is None and per_loop["gate_mean"][0] is None
    assert per_loop["attn_change_local"][:2] == [None, None]
    assert result["tokens"] == ids.numel() and result["windows"] == 3


def test_loss_at_loop_r_equals_a_separate_run_with_r_loops(make_model):
    model_dir = make_model(seed=1)
    result = diagnostics.diagnose(model_dir, "1..4", TEXT, **SMALL)
    ids = _windows(model_dir)
    model = PLTForCausalLM.from_pretrained(model_dir)
    for r in range(1, 5):
        with torch.no_grad():
            logits = model(ids, loops=r)[:, :-1]
        targets = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1)).item()
        accuracy = (logits.argmax(-1) == targets).float().mean().item()
        assert result["per_loop"]["loss"][r - 1] == pytest.approx(loss, rel=1e-5)
        assert result["per_loop"]["accuracy"][r - 1] == pytest.approx(accuracy, abs=1e-7)
        per_window = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                                       reduction="none").mean(1)
        assert result["loss_per_window"][r - 1] == pytest.approx(per_window.tolist(), rel=1e-5)


def test_default_text_is_the_eval_set(make_model):
    from plt_port.evaluate import evaluate

    model_dir = make_model(seed=3)
    result = diagnostics.diagnose(model_dir, 3, None, seq_len=32, max_tokens=64, progress=False)
    for loops in (2, 3):
        expected = evaluate(model_dir, loops=loops, max_tokens=64, seq_len=32)
        assert result["per_loop"]["loss"][loops - 1] == pytest.approx(expected["loss"], rel=1e-5)
        assert result["per_loop"]["accuracy"][loops - 1] == pytest.approx(expected["accuracy"])


def test_per_layer_values_belong_to_their_layer(make_model):
    """Loop 1 at layer l is the loop-1 output of the model cut after layer l."""
    model_dir = make_model(num_hidden_layers=3)
    result = diagnostics.diagnose(model_dir, 2, TEXT, **SMALL)
    ids = _windows(model_dir)
    for layer in range(3):
        model = PLTForCausalLM.from_pretrained(model_dir)
        model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:layer + 1])
        with torch.no_grad():
            _, trace = model(ids, loops=1, return_trace=True)
        expected = _np_step(trace.hidden[0].numpy(), trace.embeddings.numpy())
        assert result["per_layer"]["step_size"][0][layer] == pytest.approx(expected, rel=1e-5)
        assert result["per_layer"]["effective_rank"][0][layer] == pytest.approx(
            _np_effective_rank(trace.hidden[0].numpy()), rel=1e-5)
    # the loop value of a hidden-state metric is the last layer's, of an attention metric the mean
    for key in ("step_size", "kl_shift", "alignment"):
        assert result["per_loop"][key][1] == result["per_layer"][key][1][-1]
    assert result["per_loop"]["gate_mean"][1] == pytest.approx(
        np.mean(result["per_layer"]["gate_mean"][1]))


def test_constant_gates_give_their_value(make_model, tmp_path, tokenizer_dir):
    source = make_model()
    config = PLTConfig.from_file(source)
    tensors = checkpoint.load_tensors(source, config)
    for name in tensors:
        if "plt_gate.weight" in name:
            tensors[name][:] = 0.0
        elif "plt_gate.bias" in name:
            tensors[name][:] = math.log(0.7 / 0.3)
    checkpoint.save_model_dir(tmp_path / "gate07", config, tensors, tokenizer_dir)
    result = diagnostics.diagnose(tmp_path / "gate07", 3, TEXT, **SMALL)
    for row in result["per_layer"]["gate_mean"][1:]:
        assert row == pytest.approx([0.7, 0.7], rel=1e-6)


def test_batching_does_not_change_the_numbers(make_model):
    model_dir = make_model(seed=2)
    one = diagnostics.diagnose(model_dir, 3, TEXT, **{**SMALL, "batch_size": 1})
    three = diagnostics.diagnose(model_dir, 3, TEXT, **{**SMALL, "batch_size": 3})
    for key, values in one["per_layer"].items():
        for a, b in zip(np.ravel(values), np.ravel(three["per_layer"][key])):
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-5, abs=1e-7), key


def test_v1_model_has_no_offset_cost(make_model):
    result = diagnostics.diagnose(make_model("v1"), 3, TEXT, **SMALL)
    assert result["per_loop"]["offset_cost"] == [None, None, None]
    assert all(v is not None for v in result["per_loop"]["gate_mean"][1:])


def test_bad_inputs_raise_one_clear_error(make_model):
    model_dir = make_model()
    with pytest.raises(diagnostics.DiagnosticsError, match="at least 2"):
        diagnostics.diagnose(model_dir, 2, "", **SMALL)
    with pytest.raises(diagnostics.DiagnosticsError, match="batch_size"):
        diagnostics.diagnose(model_dir, 2, TEXT, **{**SMALL, "batch_size": 0})


def test_cli_writes_table_json_and_plots(make_model, tmp_path, capsys):
    model_dir = make_model()
    text_file = tmp_path / "held_out.py"
    text_file.write_text(TEXT[:4000], encoding="utf-8")
    out = tmp_path / "diag"
    assert main(["diagnose", "--model", model_dir, "--loops", "1..3", "--text", str(text_file),
                 "--out", str(out), "--seq-len", "32", "--max-tokens", "64"]) == 0
    printed = capsys.readouterr().out
    assert "| step_size |" in printed and "loop 3" in printed
    result = json.loads((out / "diagnostics.json").read_text())
    assert result["loops"] == 3 and len(result["per_loop"]["kl_shift"]) == 3
    assert (out / "effective_rank.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "table.md").read_text().startswith("| metric |")
    assert main(["diagnose", "--model", model_dir, "--loops", "2..3", "--text", str(text_file),
                 "--out", str(out)]) == 1
    assert "per-loop metrics start at loop 1" in capsys.readouterr().err


def test_loop_analysis_figures_for_the_demo(make_model):
    from matplotlib.figure import Figure

    figs = diagnostics.loop_analysis_figures(make_model(), loops=3, text=TEXT, max_tokens=64,
                                             seq_len=32)
    titles = [title for title, _ in figs]
    assert len(figs) == len(diagnostics.METRICS)
    assert all(isinstance(fig, Figure) for _, fig in figs)
    assert diagnostics.METRIC_BY_KEY["gate_mean"].label in titles


# ---- plt-port study -----------------------------------------------------------------------

def _run(loops, rank, kl, alignment, gate):
    none = [None] * loops
    per_loop = {m.key: list(none) for m in diagnostics.METRICS}
    per_loop.update(effective_rank=rank, kl_shift=kl, alignment=alignment, gate_mean=gate)
    return {"loops": loops, "per_loop": per_loop, "per_layer": {}}


def _study(probe_losses, trained_losses, rank, alignment, gate):
    """A constructed study: a 2-loop probe run at 1..4 plus models trained with 1, 3, 4 loops."""
    models = {}
    for trained, loss in trained_losses.items():
        evals = {str(trained): {"loss": loss}}
        diag = _run(4, rank, [5.0, 2.0, 0.5, 0.4], alignment, gate)
        if trained == 2:
            evals = {str(r): {"loss": v} for r, v in probe_losses.items()}
        models[f"plt-l{trained}"] = {"trained_loops": trained, "eval": evals, "diagnostics": diag}
    return {"probe": "plt-l2", "max_inference_loops": 4, "models": models}


def test_loopcoder_comparison_is_computed_from_the_numbers():
    from plt_port.study import compare_with_loopcoder

    agreeing = _study({1: 3.0, 2: 2.5, 3: 2.6, 4: 2.7}, {1: 3.0, 2: 2.5, 3: 2.6, 4: 2.8},
                      rank=[40.0, 50.0, 45.0, 44.0], alignment=[None, 0.3, -0.4, -0.2],
                      gate=[None, 0.6, 0.7, 0.55])
    verdicts = {f["claim"]: f["verdict"] for f in compare_with_loopcoder(agreeing)}
    assert set(verdicts.values()) == {"agree"}, verdicts

    differing = _study({1: 3.0, 2: 2.5, 3: 2.4, 4: 2.3}, {1: 3.0, 2: 2.5, 3: 2.4, 4: 2.6},
                       rank=[50.0, 40.0, 45.0, 44.0], alignment=[None, 0.3, 0.4, -0.2],
                       gate=[None, 0.4, 0.45, 0.3])
    findings = {f["claim"]: f for f in compare_with_loopcoder(differing)}
    verdict = {claim: f["verdict"] for claim, f in findings.items()}
    assert verdict["Loop 2 has the largest effective rank"] == "differ"
    assert verdict["Later loops oscillate (negative update alignment at loops >= 3)"] == \
        "partly agree"
    assert verdict["Gate mean stays above 0.5 (global branch dominates)"] == "differ"
    assert verdict["Loops 3 and 4 regress: the 2-loop model run with more loops"] == "differ"
    assert verdict["Loops 3 and 4 regress: models trained with more loops"] == "partly agree"
    assert verdict["Two loops are best (lowest held-out loss of the family)"] == "differ"
    assert "largest at loop 1" in findings["Loop 2 has the largest effective rank"]["evidence"][0]

    noisy = _study({1: 3.0, 2: 2.5, 3: 2.6, 4: 2.7}, {2: 2.5}, rank=[40.0, 50.0, 45.0, 44.0],
                   alignment=[None, 0.3, -0.4, -0.2], gate=[None, 0.6, 0.7, 0.55])
    for model in noisy["models"].values():
        model["diagnostics"].update(windows_sha256="same",
                                    loss_per_window=[[2.0, 2.0], [1.0, 1.0], [1.0, 1.4], [2.0, 2.5]])
    findings = {f["claim"]: f for f in compare_with_loopcoder(noisy)}
    inference = findings["Loops 3 and 4 regress: the 2-loop model run with more loops"]
    # L=3 - L=2 per window: 0, 0.4 -> mean 0.2, 2 SE = 2 * 0.2828 / sqrt(2) = 0.4: not significant
    # L=4 - L=2: 1.0, 1.5 -> mean 1.25, 2 SE = 0.5: significant
    assert "+0.2000 ± 0.4000" in inference["evidence"][1]
    assert "+1.2500 ± 0.5000" in inference["evidence"][2]
    assert inference["caveat"].startswith("1 of 2 loss differences are within 2 standard errors")
    assert inference["verdict"] == "partly agree"  # the L=3 regression is within noise

    alone = _study({1: 3.0, 2: 2.5, 3: 2.6, 4: 2.7}, {2: 2.5}, rank=[40.0, 50.0, 45.0, 44.0],
                   alignment=[None, 0.3, -0.4, -0.2], gate=[None, 0.6, 0.7, 0.55])
    verdict = {f["claim"]: f["verdict"] for f in compare_with_loopcoder(alone)}
    for claim in ("Two loops are best (lowest held-out loss of the family)",
                  "Loops 3 and 4 regress: models trained with more loops"):
        assert verdict[claim].startswith("cannot tell"), claim


@requires("plt_port.evaluate")
def test_study_command_writes_report_from_its_own_numbers(make_model, tmp_path, capsys):
    family = {f"tiny-l{loops}": make_model(seed=loops, plt_num_loops=loops) for loops in (2, 3)}
    out = tmp_path / "study"
    args = ["study", "--out", str(out), "--max-tokens", "64", "--seq-len", "32",
            "--eval-tokens", "64", "--chains-depths", "1", "2", "--chains-programs", "4"]
    args += [f"--{kind}={name}={d}" for name, d in family.items() for kind in ("model",
                                                                             "chains-model")]
    assert main(args) == 0
    study = json.loads((out / "study.json").read_text())
    report = (out / "README.md").read_text()
    assert study["probe"] == "tiny-l2"
    assert sorted(study["models"]["tiny-l2"]["eval"]) == ["1", "2", "3", "4"]
    loss3 = study["models"]["tiny-l3"]["eval"]["3"]["loss"]
    assert f"{loss3:.4f}" in report
    assert (out / "figures" / "loss_vs_loops.png").exists()
    assert "figures/effective_rank.png" in report and (out / "figures" / "effective_rank.png").exists()
    assert "Small models: **" in report
    # the chains section: accuracy by depth at inference loops 1..4, with standard errors
    chains = study["chains"]["models"]
    assert [(r["loops"], r["depth"]) for r in chains["tiny-l3"]["rows"]] == [
        (loops, depth) for loops in (1, 2, 3, 4) for depth in (1, 2)]
    row = chains["tiny-l3"]["rows"][5]
    assert "| tiny-l3 | 3 | 3 | " in report
    assert f"{100 * row['accuracy']:.1f} ± {100 * row['stderr']:.1f}" in report
    assert (out / "figures" / "chains_accuracy_by_depth.png").exists()
    assert "tiny-l3 (L=3) vs tiny-l2 (L=2): **" in report
    # unchanged weights and settings: --reuse takes the numbers from study.json
    capsys.readouterr()
    assert main(args + ["--reuse"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the earlier numbers") == 2
    assert printed.count("reusing the earlier chain accuracy") == 2
    assert (out / "README.md").read_text() == report
    # re-rendering from the JSON gives the same report
    again = tmp_path / "again"
    assert main(["study", "--from-json", str(out / "study.json"), "--out", str(again)]) == 0
    assert (again / "README.md").read_text() == report
