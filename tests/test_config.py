import json

import pytest

from conftest import tiny_config
from plt_port.config import ConfigError, PLTConfig


def test_plt_defaults_follow_the_public_config():
    cfg = PLTConfig.from_dict({"model_type": "iquestpltcoder", "hidden_size": 64,
                               "num_attention_heads": 4, "num_key_value_heads": 2,
                               "intermediate_size": 96, "vocab_size": 100,
                               "num_hidden_layers": 2})
    assert cfg.num_loops == 2 and cfg.plt_window_size == [64, 0] and cfg.window == 65
    assert cfg.plt_normalize_per_loop and cfg.emb_scale == 1.0 and cfg.hidden_scale == 1.0
    assert not cfg.gate_uses_hidden and cfg.head_dim == 16


def test_v1_window_and_loops():
    cfg = tiny_config("v1", loop_window_size=64, loop_num=3)
    assert cfg.is_v1 and cfg.window == 64 and cfg.num_loops == 3 and not cfg.gate_uses_hidden


@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_round_trip_keeps_unknown_keys(tmp_path, fmt):
    data = json.loads(tiny_config(fmt).to_json())
    data.update({"some_future_key": {"a": [1, 2]}, "eos_token_id": [2, 7], "use_cache": True})
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = PLTConfig.from_file(tmp_path)
    assert cfg.extra["some_future_key"] == {"a": [1, 2]} and cfg.eos_token_ids == [2, 7]
    assert json.loads(cfg.to_json()) == data


def test_other_format_keys_are_kept_verbatim():
    data = json.loads(tiny_config("plt").to_json())
    data["loop_num"] = 5  # a v1 key on a PLT checkpoint: not interpreted, but kept
    cfg = PLTConfig.from_dict(data)
    assert cfg.num_loops == 2 and json.loads(cfg.to_json())["loop_num"] == 5


@pytest.mark.parametrize("field,value,message", [
    ("num_attention_heads", 5, "do not divide hidden_size"),
    ("num_key_value_heads", 3, "do not divide num_attention_heads"),
    ("plt_window_size", [64, 4], "right must be 0"),
    ("plt_window_size", [64, -1], "right must be 0"),
    ("plt_window_size", [64], r"\[left, right\]"),
    ("plt_num_loops", 0, "plt_num_loops"),
    ("plt_num_loops", 9, "plt_num_loops"),
    ("hidden_size", -4, "hidden_size"),
    ("model_type", "llama", "model_type"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("rms_norm_eps", 0, "rms_norm_eps"),
    ("rope_theta", "x", "rope_theta"),
    ("hidden_size", "64", "must be an integer"),
    ("hidden_size", 64.0, "must be an integer"),
    ("plt_window_size", 64, r"\[left, right\]"),
    ("plt_window_size", [True, 0], r"\[left, right\]"),
    ("plt_normalize_per_loop", "false", "true or false"),
    ("tie_word_embeddings", "false", "true or false"),
    ("plt_gate_use_hidden_states", 1, "true or false"),
    ("plt_emb_scale", True, "a number or null"),
    ("plt_num_loops", 2.0, "must be an integer"),
    ("head_dim", "16", "must be an integer"),
    ("eos_token_id", "x", "eos_token_id"),
])
def test_validation_names_the_field(field, value, message):
    data = json.loads(tiny_config("plt").to_json())
    data[field] = value
    with pytest.raises(ConfigError, match=message) as err:
        PLTConfig.from_dict(data)
    assert field.split("_id")[0] in str(err.value) or field in str(err.value)


@pytest.mark.parametrize("field,value", [("loop_num", 0), ("loop_window_size", 0),
                                         ("loop_num", 2.0), ("loop_window_size", "64")])
def test_v1_validation(field, value):
    data = json.loads(tiny_config("v1").to_json())
    data[field] = value
    with pytest.raises(ConfigError, match=field):
        PLTConfig.from_dict(data)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        PLTConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable JSON"):
        PLTConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="unreadable JSON"):
        PLTConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="model_type"):
        PLTConfig.from_file(tmp_path)
