"""Hostile inputs: each must end in one clear PLTError (CLI: one `error:` line, exit 1), never a
traceback, a hang, an allocation the machine cannot make, or silent garbage."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import requires, tiny_config
from plt_port import atomic, checkpoint, memory
from plt_port.checkpoint import CheckpointError, load_tensors
from plt_port.app.cli import main
from plt_port.config import ConfigError, PLTConfig
from plt_port.errors import PLTError
from plt_port.tokenizer import Tokenizer, TokenizerError
from runtimes.sampling import NonFiniteLogitsError, Sampler, SamplingError, SamplingParams

DEEP_JSON = "[" * 100_000 + "]" * 100_000


def cli_error(argv: list[str], capsys) -> str:
    """The one error line of a CLI run that must fail cleanly."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def edit_config(model_dir: str, **changes) -> None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        f.write(json.dumps(data))  # json.dumps writes NaN/Infinity, as a hand-edited file may


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) when a test blocks for 20 s."""
    def timeout(*_):
        raise TimeoutError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---- 1. non-finite numbers -------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("rms_norm_eps", math.inf), ("rms_norm_eps", math.nan), ("rope_theta", math.inf),
    ("plt_emb_scale", math.inf), ("plt_emb_scale", math.nan), ("plt_hidden_scale", -math.inf),
])
def test_non_finite_config_numbers_are_rejected(field, value):
    data = json.loads(tiny_config().to_json())
    data[field] = value
    with pytest.raises(ConfigError, match=field):
        PLTConfig.from_dict(data)


def test_non_finite_weights_are_rejected_at_load(make_model):
    model_dir = make_model()
    path = os.path.join(model_dir, checkpoint.SINGLE_FILE)
    header, offset = checkpoint.read_header(path)
    start = header["model.norm.weight"]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(offset + start)
        f.write(np.array([np.nan], np.float32).tobytes())
    with pytest.raises(CheckpointError, match="model.norm.weight holds NaN"):
        load_tensors(model_dir)


def test_non_finite_logits_are_an_error_not_token_0():
    logits = np.zeros((1, 8), np.float32)
    logits[0, 3] = np.nan
    for params in (SamplingParams(), SamplingParams(temperature=0.7, seed=0)):
        with pytest.raises(NonFiniteLogitsError):
            Sampler(params)(logits)


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = np.array([[1.0, 5.0, 2.0, -3.0]], np.float32)
    for temperature in (1e-310, 5e-324, 1e-30):
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=3, top_p=0.9, seed=0))
        assert sampler(logits).tolist() == [1]


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty"])
def test_infinite_sampling_parameters_are_rejected(name):
    with pytest.raises(SamplingError, match=name):
        SamplingParams(**{name: math.inf})


def test_cli_nan_weights_print_one_error(make_model, capsys):
    model_dir = make_model()
    edit_config(model_dir, rms_norm_eps=math.inf)
    assert "rms_norm_eps" in cli_error(["generate", "--model", model_dir, "x"], capsys)


# ---- 2. oversized requests -------------------------------------------------------------------
def test_the_ring_window_never_exceeds_the_context():
    config = tiny_config(plt_window_size=[10**9, 0], max_position_embeddings=512)
    assert config.window == 512
    assert tiny_config("v1", loop_window_size=10**9).window == 512


def test_a_kv_cache_larger_than_memory_is_refused(make_model, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**30)
    model_dir = make_model(max_position_embeddings=2**24)  # 8 GiB of KV cache at 2**24
    line = cli_error(["generate", "--model", model_dir, "--max-new-tokens", str(2**24 - 16),
                      "x"], capsys)
    assert "KV cache of" in line and "GiB of memory available" in line


def test_absurd_model_sizes_are_config_errors(make_model, capsys):
    model_dir = make_model()
    path = os.path.join(model_dir, "config.json")
    config = json.load(open(path))
    for field, value in [("max_position_embeddings", 10**15), ("num_hidden_layers", 2**40),
                         ("vocab_size", 10**11)]:
        with open(path, "w") as f:
            json.dump({**config, field: value}, f)
        line = cli_error(["generate", "--model", model_dir, "x"], capsys)
        assert field in line and "must be an integer in" in line


def test_check_fits_names_the_request_and_the_limit(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**30)
    memory.check_fits(2**29, "half")
    with pytest.raises(memory.MemoryLimitError, match=r"twice needs about 2 GiB.* 1 GiB"):
        memory.check_fits(2**31, "twice")


def test_diagnose_attention_maps_count_against_memory(monkeypatch):
    config = tiny_config(max_position_embeddings=10**6)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 6 * 2**30)
    memory.check_forward(config, 4, 4096, 2)
    with pytest.raises(memory.MemoryLimitError, match="4 windows of 4096 tokens"):
        memory.check_forward(config, 4, 4096, 2, keep_attention=True)


@requires("torch")
def test_eval_and_diagnose_refuse_windows_beyond_the_context(make_model, capsys):
    model_dir = make_model()
    for command in ("eval", "diagnose"):
        line = cli_error([command, "--model", model_dir, "--seq-len", "100000"], capsys)
        assert "seq_len 100000" in line and "max_position_embeddings=512" in line


def test_bench_refuses_a_random_model_larger_than_memory(tmp_path):
    from runtimes.benchmark import random_model_dir

    with pytest.raises(memory.MemoryLimitError, match="parameters needs about"):
        random_model_dir("vocab_size=16777216,hidden_size=16384", root=str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("spec", ["extra=1", "vocab_size=" + "[" * 5000])
def test_bench_random_rejects_unknown_fields_and_bad_values(spec):
    from runtimes.benchmark import BenchError, random_config

    with pytest.raises(BenchError):
        random_config(spec)


# ---- 3, 8. JSON that is not JSON, or nested too deep ---------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json",
                                  checkpoint.INDEX_FILE])
def test_deeply_nested_json_is_a_clean_error(make_model, name):
    model_dir = make_model()
    with open(os.path.join(model_dir, name), "w") as f:
        f.write(DEEP_JSON)
    with pytest.raises(PLTError, match="nested too deeply"):
        if name == "tokenizer_config.json":
            Tokenizer.from_dir(model_dir)
        else:
            load_tensors(model_dir)


@requires("mlx")
def test_mlx_backend_with_a_broken_config_is_a_clean_error(make_model, capsys):
    model_dir = make_model()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write("{not json")
    assert "unreadable JSON" in cli_error(["generate", "--backend", "mlx", "--model", model_dir,
                                           "x"], capsys)


# ---- 4. safetensors headers the reference library rejects ----------------------------------------
def _rewrite_header(path: str, edit) -> None:
    """Rewrite the header text of a safetensors file with `edit(header_text) -> text`."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        text, data = f.read(n).decode(), f.read()
    text = edit(text).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def test_a_tensor_key_given_twice_is_rejected(make_model):
    model_dir = make_model()
    path = os.path.join(model_dir, checkpoint.SINGLE_FILE)
    entry = json.dumps(_header(path)["model.norm.weight"])
    _rewrite_header(path, lambda text: text[:-1] + f', "model.norm.weight": {entry}}}')
    with pytest.raises(CheckpointError, match="given twice"):
        load_tensors(model_dir)


def test_integer_weights_are_rejected(make_model):
    model_dir = make_model()
    path = os.path.join(model_dir, checkpoint.SINGLE_FILE)
    header = _header(path)
    entry = header["model.norm.weight"]
    entry["dtype"] = "I32"  # same bytes: only the dtype is wrong
    _rewrite_header(path, lambda _: json.dumps(header))
    with pytest.raises(CheckpointError, match="must be floating point.*model.norm.weight"):
        load_tensors(model_dir)


@pytest.mark.parametrize("change,message", [
    ("overlap", "expected"), ("trailing", "data section"), ("gap", "expected")])
def test_byte_ranges_must_tile_the_data_section(make_model, change, message):
    model_dir = make_model()
    path = os.path.join(model_dir, checkpoint.SINGLE_FILE)
    header = _header(path)
    meta = header.pop("__metadata__", None)
    first, second = sorted(header, key=lambda k: header[k]["data_offsets"])[:2]
    if change == "overlap":  # two names over the same bytes
        header[second] = dict(header[first])
    if change == "gap":  # the last tensor moved 4 bytes on: a gap, and past the data's end
        last = max(header, key=lambda k: header[k]["data_offsets"])
        header[last]["data_offsets"] = [o + 4 for o in header[last]["data_offsets"]]
    if meta is not None:
        header["__metadata__"] = meta
    _rewrite_header(path, lambda _: json.dumps(header))
    if change in ("trailing", "gap"):
        with open(path, "ab") as f:
            f.write(b"\0" * 4)
    with pytest.raises(CheckpointError, match=message):
        load_tensors(model_dir)


def test_check_model_dir_names_a_truncated_weight_file(make_model):
    model_dir = make_model()
    path = os.path.join(model_dir, checkpoint.SINGLE_FILE)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="does not hold"):
        checkpoint.check_model_dir(model_dir)


# ---- 5. FIFOs and other non-regular files ---------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.model",
                                  "tokenizer_config.json"])
def test_a_fifo_in_a_model_dir_is_refused_not_read(make_model, name, no_hang):
    model_dir = make_model()
    os.remove(os.path.join(model_dir, name))
    os.mkfifo(os.path.join(model_dir, name))
    with pytest.raises(PLTError, match="not a regular file"):
        if name.startswith("tokenizer"):
            Tokenizer.from_dir(model_dir)
        else:
            load_tensors(model_dir)


# ---- 6. prompts that are not UTF-8 ---------------------------------------------------------------
def test_undecodable_prompt_bytes_are_a_clean_error(make_model, capsys):
    model_dir = make_model()
    tokenizer = Tokenizer.from_dir(model_dir)
    with pytest.raises(TokenizerError, match="not valid UTF-8"):
        tokenizer.encode(b"\xff\xfe def".decode("utf-8", "surrogateescape"))
    line = cli_error(["generate", "--model", model_dir, "\udcff\udcfe def"], capsys)
    assert "not valid UTF-8" in line


def test_undecodable_stdin_is_a_clean_error(make_model):
    result = subprocess.run([sys.executable, "-m", "plt_port.app.cli", "generate", "--model",
                             make_model(), "-"], input=b"\xff\xfe def", capture_output=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr and b"not valid" in result.stderr


# ---- 7. damaged exports --------------------------------------------------------------------------
@requires("onnx")
@pytest.mark.parametrize("damage,message", [
    ("delete tokenizer.model", "tokenizer.model: no such file"),
    ("truncate weights.bin", "weights.bin has 1000 bytes"),
    ("drop manifest key", "loops must be an integer"),
    ("random model.onnx", "model.onnx has"),
    ("same-size model.onnx", "model.onnx differs"),
    ("weight outside the file", "does not lie inside"),
    ("deep manifest", "nested too deeply"),
])
def test_damaged_onnx_exports_are_named(make_model, tmp_path, damage, message):
    from exporters.onnx_export import ExportError, check_export, export
    from runtimes.backends import BackendError, load_backend

    out = export(make_model(), tmp_path / "export")
    manifest_path = os.path.join(out, "plt_onnx.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    graph = os.path.join(out, "model.onnx")
    if damage == "delete tokenizer.model":
        os.remove(os.path.join(out, "tokenizer.model"))
    elif damage == "truncate weights.bin":
        os.truncate(os.path.join(out, "weights.bin"), 1000)
    elif damage == "drop manifest key":
        del manifest["loops"]
    elif damage == "random model.onnx":
        with open(graph, "wb") as f:
            f.write(np.random.default_rng(0).bytes(5000))
    elif damage == "same-size model.onnx":
        size = os.path.getsize(graph)
        with open(graph, "wb") as f:
            f.write(np.random.default_rng(0).bytes(size))
    elif damage == "weight outside the file":
        next(iter(manifest["weights"].values()))["offset"] = 10**9
    if damage in ("drop manifest key", "weight outside the file"):
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)
    if damage == "deep manifest":
        with open(manifest_path, "w") as f:
            f.write(DEEP_JSON)
    with pytest.raises(ExportError, match=message):
        check_export(out)
    with pytest.raises(BackendError, match=message):
        load_backend("onnx", out)


@requires("onnxruntime")
def test_onnx_provider_is_checked_before_exporting(make_model):
    from exporters.export_store import export_root
    from runtimes.backends import BackendError, load_backend

    exports = os.path.join(export_root(), "exports", "onnx")
    before = sorted(os.listdir(exports)) if os.path.isdir(exports) else []
    with pytest.raises(BackendError, match="provider"):
        load_backend("onnx", make_model(seed=7), provider="tpu")
    assert (sorted(os.listdir(exports)) if os.path.isdir(exports) else []) == before


# ---- 9. bench extra fields: above; 10. demo numbers ------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, "nan", math.inf, "-inf", 1e300])
def test_demo_number_fields_reject_nan_and_infinity(value):
    columns = pytest.importorskip("demo.columns")
    with pytest.raises(columns.DemoInputError, match="loops"):
        columns.as_int(value, "loops", 1, 8)
    with pytest.raises(columns.DemoInputError, match="top-p"):
        columns.as_float(value, "top-p", 0.01, 1.0)


def test_demo_pool_drains_least_recently_used_engines_over_budget(make_model):
    """Engines per (model, backend, speculative setting) within a budget of two models'
    weights: the least recently used goes (its thread ends), the others stay; an engine
    that drafts with another model counts that model's weights too."""
    from conftest import ConstantBackend

    columns = pytest.importorskip("demo.columns")
    dirs = {name: make_model(seed=i) for i, name in enumerate(("a", "b", "c"))}
    weight_bytes = memory.FP32 * checkpoint.parameter_count(PLTConfig.from_file(dirs["a"]))
    pool = columns.EnginePool(dirs, loader=lambda name, path, loops=None: ConstantBackend(path, loops),
                              memory_budget=2 * weight_bytes)
    engines = {}
    for model in ("a", "b", "a", "c"):
        engines[model] = pool.engine(columns.ColumnSpec(model, "torch", 2, "clp"))
        engines[model].ready.wait(30)
    try:
        assert pool.loaded() == [(dirs["a"], "torch", "off"), (dirs["c"], "torch", "off")]
        engines["b"].thread.join(30)
        assert not engines["b"].thread.is_alive() and engines["a"].alive and engines["c"].alive
        pool.engine(columns.ColumnSpec("a", "torch", 2, "clp", "draft b"))  # a and b: 2 models
        assert pool.loaded() == [(dirs["a"], "torch", "draft b")]
    finally:
        pool.close()


# ---- also: permissions, stale temp folders, missing dirs, templates, tokenizer paths -----------
def test_export_refuses_tokenizer_links_out_of_the_model_dir(make_model, tmp_path):
    model_dir = make_model()
    private = tmp_path / "private.model"
    shutil.move(os.path.join(model_dir, "tokenizer.model"), private)
    os.chmod(private, 0o600)
    os.symlink(private, os.path.join(model_dir, "tokenizer.model"))
    with pytest.raises(CheckpointError, match="links outside the model directory"):
        checkpoint.copy_tokenizer(model_dir, str(tmp_path))
    assert not os.path.exists(tmp_path / "tokenizer.model")


def test_copied_tokenizer_files_keep_their_permissions(make_model, tmp_path):
    model_dir = make_model()
    os.chmod(os.path.join(model_dir, "tokenizer.model"), 0o600)
    checkpoint.copy_tokenizer(model_dir, str(tmp_path))
    assert os.stat(tmp_path / "tokenizer.model").st_mode & 0o777 == 0o600


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temp_folders_of_killed_writers_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".out.tmp-{dead}-abc123"
    running = tmp_path / f".out.tmp-{alive}-def456"
    foreign = tmp_path / f".out.tmp-{dead}-xyz789"  # no marker: not ours
    stale_file = tmp_path / f".eval.json.tmp-{dead}-ghi012.plt-port"
    for folder in (stale, running, foreign):
        folder.mkdir()
    for folder in (stale, running):
        (folder / atomic.OUTPUT_MARKER).write_text("")
    stale_file.write_text("partial")
    with atomic.atomic_dir(tmp_path / "out") as tmp:
        (open(os.path.join(tmp, "x"), "w")).close()
    assert sorted(os.listdir(tmp_path)) == sorted(["out", running.name, foreign.name])


def test_a_failed_move_aside_leaves_no_empty_old_folder(tmp_path, monkeypatch):
    with atomic.atomic_dir(tmp_path / "out"):
        pass
    real_rename = os.rename

    def rename(src, dst):
        if str(src) == str(tmp_path / "out"):
            raise OSError("busy")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="busy"):
        with atomic.atomic_dir(tmp_path / "out"):
            pass
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_missing_model_dir_is_named_itself(tmp_path, capsys):
    missing = str(tmp_path / "missing" / "dir")
    assert f"{missing}: no such model directory" in cli_error(
        ["generate", "--model", missing, "x"], capsys)


def test_chat_template_work_is_bounded(make_model):
    tokenizer = Tokenizer.from_dir(make_model())
    for template in ["{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}"
                     "{% endfor %}", "{{ 'a' * 10**9 }}", "{{ 2 ** 100000000 }}"]:
        tokenizer.chat_template = template
        with pytest.raises(TokenizerError, match="chat_template"):
            tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_saved_tokenizers_carry_no_machine_paths(tokenizer_dir):
    from sentencepiece import sentencepiece_model_pb2

    from plt_port import family as models

    for model_dir in [tokenizer_dir, *models.family_model_dirs().values()]:
        proto = sentencepiece_model_pb2.ModelProto()
        with open(os.path.join(model_dir, "tokenizer.model"), "rb") as f:
            proto.ParseFromString(f.read())
        spec = proto.trainer_spec
        assert spec.input and not any(os.path.isabs(p) for p in spec.input)
        assert os.sep not in spec.model_prefix
