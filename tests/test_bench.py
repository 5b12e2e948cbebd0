"""plt-port bench: structure and consistency on a tiny model (never timings)."""

from __future__ import annotations

import json

import pytest

from conftest import requires
from plt_port.checkpoint import load_tensors
from plt_port.app.cli import main
from plt_port.config import PLTConfig
from plt_port.random_model import PRESETS
from runtimes.backends import load_backend
from runtimes.benchmark import (BenchError, BenchSettings, parameter_count, random_config,
                                random_model_dir, run_bench)


def test_rows_cover_loops_modes_and_batches_with_consistent_figures(make_model):
    model_dir = make_model("plt")
    settings = BenchSettings(loops=[1, 2, 3], batches=[1, 2], steps=3, prompt_len=9, warmup=1)
    result = run_bench(model_dir, settings, progress=False)
    rows = result["rows"]
    # loops=1 has no CLP: one naive row; loops 2 and 3 run both modes; each at both batches
    assert [(r["loops"], r["batch"], r["mode"]) for r in rows] == [
        (loops, batch, mode) for loops, modes in [(1, ["naive"]), (2, ["clp", "naive"]),
                                                  (3, ["clp", "naive"])]
        for batch in (1, 2) for mode in modes]
    for r in rows:
        backend = load_backend("torch", model_dir, loops=r["loops"])
        assert r["capacity"] == 9 + 1 + 3 + 1
        assert r["cache_bytes"] == backend.expected_cache_bytes(r["batch"], r["capacity"], 4)
        assert r["decode_tps"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        same_batch = [n for n in rows if n["batch"] == r["batch"]]
        naive = next(n for n in same_batch if n["loops"] == r["loops"] and n["mode"] == "naive")
        assert r["vs_naive"] == pytest.approx(r["step_ms"] / naive["step_ms"])
        assert r["vs_loops1"] == pytest.approx(r["step_ms"] / same_batch[0]["step_ms"])
    assert result["model"]["parameters"] == sum(v.size for v in load_tensors(model_dir).values())


def test_v1_model_runs_naive_only(make_model):
    result = run_bench(make_model("v1"), BenchSettings(loops=[2], steps=2, prompt_len=4,
                                                       warmup=0), progress=False)
    assert [(r["loops"], r["mode"], r["vs_loops1"]) for r in result["rows"]] == [(2, "naive", None)]


def test_random_presets_and_custom_dims(tmp_path):
    assert 3e6 < parameter_count(random_config("small")[1]) < 8e6
    assert 90e6 < parameter_count(random_config("100m")[1]) < 130e6
    name, config = random_config("hidden_size=32,num_hidden_layers=1,vocab_size=300")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 1, 300)
    assert config.intermediate_size == PRESETS["small"]["intermediate_size"]
    assert name.startswith("custom-")
    path = random_model_dir("tiny", root=str(tmp_path))
    assert PLTConfig.from_file(path).hidden_size == PRESETS["tiny"]["hidden_size"]
    assert random_model_dir("tiny", root=str(tmp_path)) == path  # reused
    with pytest.raises(BenchError, match="preset"):
        random_config("huge")
    with pytest.raises(BenchError, match="steps"):
        BenchSettings(steps=0)


def test_cli_table_and_json(make_model, tmp_path, capsys):
    model_dir = make_model("plt")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", model_dir, "--loops", "1,2", "--modes", "clp,naive",
                 "--batch", "1,4", "--steps", "2", "--prompt-len", "5", "--warmup", "0",
                 "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [(r["loops"], r["batch"], r["mode"]) for r in result["rows"]] == [
        (1, 1, "naive"), (1, 4, "naive"), (2, 1, "clp"), (2, 1, "naive"), (2, 4, "clp"),
        (2, 4, "naive")]
    assert result["settings"]["backend_options"] == {"torch": {"device": "cpu", "threads": 1}}
    for r in result["rows"]:
        assert f"{r['step_ms']:.2f}" in table
    assert main(["bench", "--model", model_dir, "--modes", "fast"]) == 1
    assert main(["bench", "--model", model_dir, "--backend", "nope", "--steps", "1"]) == 1
    assert "unknown backend 'nope'" in capsys.readouterr().err


def test_mlx_lm_rows_run_on_the_mlx_weights_interleaved_with_mlx(make_model):
    pytest.importorskip("mlx_lm")
    model_dir = make_model("v1")
    settings = BenchSettings(backends=["mlx", "mlx-lm"], loops=[2], batches=[1, 2], steps=2,
                             prompt_len=5, warmup=1)
    rows = run_bench(model_dir, settings, progress=False)["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [("mlx", 1), ("mlx", 2), ("mlx-lm", 1),
                                                           ("mlx-lm", 2)]
    assert all(r["cache_bytes"] > 0 and r["mode"] == "naive" for r in rows)
    with pytest.raises(BenchError, match="v1"):
        run_bench(make_model("plt"), BenchSettings(backends=["mlx-lm"], loops=[2], steps=1,
                                                   prompt_len=3, warmup=0), progress=False)


@requires("llguidance")
def test_constrained_rows_pair_free_and_json_runs(make_model, capsys, tmp_path, monkeypatch):
    """--constrained: each configuration as a "free" and a "json" run (vs_free = json / free);
    a model without a tokenizer gets a code vocabulary of its size."""
    model_dir = make_model("plt")
    assert main(["bench", "--model", model_dir, "--loops", "2", "--batch", "1,2", "--steps",
                 "3", "--prompt-len", "5", "--warmup", "1", "--constrained"]) == 0
    table = capsys.readouterr().out
    assert "| grammar |" in table and "vs free" in table
    monkeypatch.setenv("PLT_PORT_CACHE", str(tmp_path / "cache"))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "array", "items": {"type": "integer"}}))
    bare = random_model_dir("tiny", root=str(tmp_path / "random"))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", bare, "--loops", "2", "--modes", "clp", "--batch", "1,2",
                 "--steps", "2", "--prompt-len", "4", "--json-schema", str(schema),
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["grammar"]) for r in rows] == [
        (1, "free"), (1, "json"), (2, "free"), (2, "json")]
    for free, constrained in zip(rows[::2], rows[1::2]):
        assert free["vs_free"] is None
        assert 0 < free["sample_ms"] < free["step_ms"] and 0 < constrained["sample_ms"]
        assert constrained["vs_free"] == pytest.approx(constrained["step_ms"] / free["step_ms"])
        assert constrained["grammar_overhead"] == pytest.approx(
            (constrained["sample_ms"] - free["sample_ms"]) / free["step_ms"])
    assert (tmp_path / "cache" / "tokenizers" / "code-512" / "tokenizer.json").exists()


def test_contexts_time_steps_over_caches_of_each_length(tmp_path, capsys, monkeypatch):
    """`--contexts` with `--windows`: one row per (window, loops, mode), a step at each
    context over caches that hold that many positions; the same weights at each window."""
    monkeypatch.setenv("PLT_PORT_CACHE", str(tmp_path))
    out = tmp_path / "contexts.json"
    spec = 'model_type="iquestloopcoder",loop_num=2,hidden_size=32,num_hidden_layers=1,' \
           'num_attention_heads=2,num_key_value_heads=1,intermediate_size=48,vocab_size=300'
    assert main(["bench", "--random", spec, "--contexts", "20,300", "--windows", "8,64",
                 "--loops", "1,2", "--steps", "2", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["window"], r["loops"], r["context"]) for r in rows} == {
        (w, loops, c) for w in (8, 64) for loops in (1, 2) for c in (20, 300)}
    for r in rows:  # rings of min(window, capacity) slots next to the global cache
        backend = load_backend("torch", json.loads(out.read_text())["model_dirs"][
            r["window"] == 64], loops=r["loops"])
        assert r["cache_bytes"] == backend.expected_cache_bytes(1, r["context"] + 3, 2)  # bf16
    tables = [load_tensors(d) for d in json.loads(out.read_text())["model_dirs"]]
    assert all((tables[0][k] == tables[1][k]).all() for k in tables[0])
    assert "step ms @ 300" in capsys.readouterr().out
    assert main(["bench", "--random", spec, "--windows", "8"]) == 1
