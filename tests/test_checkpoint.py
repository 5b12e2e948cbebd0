import json
import os

import ml_dtypes
import numpy as np
import pytest

from conftest import tiny_config
from plt_port import atomic, checkpoint
from plt_port.checkpoint import CheckpointError, load_tensors, save_model_dir
from plt_port.errors import PLTError
from plt_port.random_model import random_tensors


@pytest.mark.parametrize("fmt", ["plt", "v1"])
@pytest.mark.parametrize("shard", [None, 40_000])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_is_bit_exact(tmp_path, fmt, shard, dtype):
    config = tiny_config(fmt)
    tensors = random_tensors(config, seed=5, dtype=dtype)
    save_model_dir(tmp_path / "m", config, tensors, max_shard_bytes=shard)
    files = os.listdir(tmp_path / "m")
    assert (checkpoint.INDEX_FILE in files) == (shard is not None)
    loaded = load_tensors(tmp_path / "m")
    assert loaded.keys() == tensors.keys()
    for name in tensors:
        assert loaded[name].dtype == dtype and np.array_equal(loaded[name], tensors[name])


def test_bf16_is_kept_as_stored_and_widened_exactly_on_request(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    config = tiny_config("plt")
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16)
               for k, v in random_tensors(config).items()}
    os.makedirs(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(config.to_json())
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    loaded = load_tensors(tmp_path / "m")
    widened = load_tensors(tmp_path / "m", dtype=np.float32)
    for name, t in tensors.items():
        assert loaded[name].dtype == ml_dtypes.bfloat16
        assert np.array_equal(loaded[name].view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
        assert widened[name].dtype == np.float32
        assert np.array_equal(widened[name], t.float().numpy())


def test_gate_alias_is_accepted(tmp_path):
    config = tiny_config("plt")
    tensors = {k.replace("plt_gate", "loop_gate_proj"): v
               for k, v in random_tensors(config).items()}
    os.makedirs(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(config.to_json())
    checkpoint.write_tensors(str(tmp_path / "m"), tensors)
    assert "model.layers.0.self_attn.plt_gate.weight" in load_tensors(tmp_path / "m")


def write_raw(path, config, tensors):
    os.makedirs(path)
    (path / "config.json").write_text(config.to_json())
    checkpoint.write_tensors(str(path), tensors)


def test_every_problem_reported_in_one_error(tmp_path):
    config = tiny_config("plt")
    tensors = random_tensors(config)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 63), np.float32)
    write_raw(tmp_path / "m", config, tensors)
    with pytest.raises(CheckpointError) as err:
        load_tensors(tmp_path / "m")
    text = str(err.value)
    for expected in ("missing: model.layers.1.mlp.up_proj.weight, model.norm.weight",
                     "unexpected: model.layers.0.extra.weight",
                     "mis-shaped: model.layers.0.self_attn.q_proj.weight is [64, 63], "
                     "expected [64, 64]"):
        assert expected in text


def test_tied_checkpoint_must_not_carry_a_head(tmp_path):
    config = tiny_config("plt", tie_word_embeddings=True)
    tensors = random_tensors(config)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    write_raw(tmp_path / "m", config, tensors)
    with pytest.raises(CheckpointError, match="unexpected: lm_head.weight"):
        load_tensors(tmp_path / "m")


def test_wrong_gate_form_is_mis_shaped(tmp_path):
    tensors = random_tensors(tiny_config("plt", plt_gate_use_hidden_states=True))
    query_form = tiny_config("plt", plt_gate_use_hidden_states=False)
    write_raw(tmp_path / "m", query_form, tensors)
    with pytest.raises(CheckpointError, match="unexpected: .*gate_norm.weight") as err:
        load_tensors(tmp_path / "m")
    assert "plt_gate.weight is [4, 64], expected [4, 16]" in str(err.value)


def test_missing_files_and_garbage(tmp_path):
    config = tiny_config("plt")
    os.makedirs(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(config.to_json())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_tensors(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_tensors(tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / checkpoint.INDEX_FILE).write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard files that are absent"):
        load_tensors(tmp_path / "m")


def test_interrupted_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    config = tiny_config("plt")
    save_model_dir(tmp_path / "m", config, random_tensors(config, seed=1))
    before = load_tensors(tmp_path / "m")

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_tensors", explode)
    with pytest.raises(KeyboardInterrupt):
        save_model_dir(tmp_path / "m", config, random_tensors(config, seed=2))
    with pytest.raises(KeyboardInterrupt):
        save_model_dir(tmp_path / "new", config, random_tensors(config, seed=2))
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temp dirs, no "new"
    after = load_tensors(tmp_path / "m")
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_refuses_to_save_incomplete_model(tmp_path):
    config = tiny_config("plt")
    tensors = random_tensors(config)
    del tensors["model.norm.weight"]
    with pytest.raises(CheckpointError, match="missing: model.norm.weight"):
        save_model_dir(tmp_path / "m", config, tensors)
    assert not os.path.exists(tmp_path / "m")


def test_no_pickle_anywhere():
    import pathlib
    root = pathlib.Path(__file__).parent.parent
    sources = [p for d in ("plt_port", "runtimes", "exporters", "demo", "metal_kernels")
               for p in (root / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        # the needles are assembled so this file does not itself match a text search for them
        for needle in ("import pickle", "pickle" + ".load", "torch" + ".load(",
                       "allow_pickle" + "=True", "trust_remote_code" + "=True", "import dill",
                       "joblib" + ".load"):
            assert needle not in text, f"{path}: {needle}"


def test_output_never_replaces_a_foreign_folder_or_an_input(tmp_path):
    config = tiny_config("plt")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(PLTError, match="did not write"):
        save_model_dir(foreign, config, random_tensors(config))
    assert (foreign / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(PLTError, match="not a directory"):
        save_model_dir(tmp_path / "file", config, random_tensors(config))
    save_model_dir(tmp_path / "m", config, random_tensors(config, seed=1))
    save_model_dir(tmp_path / "m", config, random_tensors(config, seed=2))  # ours: replaced
    assert atomic.OUTPUT_MARKER in os.listdir(tmp_path / "m")
    with pytest.raises(PLTError, match="would replace the input"):
        with atomic.atomic_dir(tmp_path / "m", inputs=(tmp_path / "m",)):
            pass
    with pytest.raises(PLTError, match="would replace the input"):
        with atomic.atomic_dir(tmp_path, inputs=(tmp_path / "m",)):
            pass
    assert load_tensors(tmp_path / "m")


def test_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    config = tiny_config("plt")
    save_model_dir(tmp_path / "m", config, random_tensors(config, seed=1))
    before = load_tensors(tmp_path / "m")
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk full")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(tmp_path / "m", config, random_tensors(config, seed=2))
    monkeypatch.undo()
    after = load_tensors(tmp_path / "m")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_a_tensor_under_its_name_and_its_alias_is_reported(tmp_path):
    config = tiny_config("plt")
    tensors = random_tensors(config)
    tensors["model.layers.0.self_attn.loop_gate_proj.bias"] = tensors[
        "model.layers.0.self_attn.plt_gate.bias"]
    write_raw(tmp_path / "m", config, tensors)
    with pytest.raises(CheckpointError, match="duplicate: .*loop_gate_proj.bias"):
        load_tensors(tmp_path / "m")


def _raw_safetensors(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize("header,message", [
    ([1, 2], "not a JSON object"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 9999]}},
     "does not hold"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 8]}},
     "does not hold"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 24]}},
     "does not hold"),
    ({"model.norm.weight": {"dtype": "Q4", "shape": [64], "data_offsets": [0, 256]}},
     "unsupported dtype"),
    ({"model.norm.weight": {"shape": [64]}}, "malformed entry"),
])
def test_malformed_safetensors_headers(tmp_path, header, message):
    os.makedirs(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(tiny_config("plt").to_json())
    _raw_safetensors(tmp_path / "m" / "model.safetensors", header, b"\0" * 256)
    with pytest.raises(CheckpointError, match=message):
        load_tensors(tmp_path / "m")


@pytest.mark.parametrize("index,message", [
    ("{broken", "unreadable JSON"),
    ('{"weights": {}}', "not a valid index"),
    ('{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}', "plain file names"),
])
def test_malformed_index(tmp_path, index, message):
    os.makedirs(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(tiny_config("plt").to_json())
    (tmp_path / "m" / checkpoint.INDEX_FILE).write_text(index)
    with pytest.raises(CheckpointError, match=message):
        load_tensors(tmp_path / "m")


def test_atomic_write_text_leaves_no_temp_file(tmp_path, monkeypatch):
    atomic.atomic_write_text(tmp_path / "a" / "out.json", "one")
    atomic.atomic_write_text(tmp_path / "a" / "out.json", "two")
    assert os.listdir(tmp_path / "a") == ["out.json"]
    assert (tmp_path / "a" / "out.json").read_text() == "two"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic.atomic_write_text(tmp_path / "a" / "out.json", "three")
    assert os.listdir(tmp_path / "a") == ["out.json"]
    assert (tmp_path / "a" / "out.json").read_text() == "two"
