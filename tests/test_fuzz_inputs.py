"""Fuzzing what a model directory can hand us: config.json and safetensors headers, mutated a few
thousand times. Every outcome is a clean load or a PLTError: never another exception, a hang,
or weights that are not finite."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from plt_port import checkpoint
from plt_port.config import PLTConfig
from plt_port.errors import PLTError
from plt_port.random_model import save_random_model

FUZZ = settings(max_examples=1500, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.just(10**400) | st.floats()
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6)


# ---- config.json ----------------------------------------------------------------------------------
def _config_fields() -> list[str]:
    return sorted(set(json.loads(tiny_config("plt").to_json()))
                  | set(json.loads(tiny_config("v1").to_json())))


@FUZZ
@given(fmt=st.sampled_from(["plt", "v1"]),
       changes=st.dictionaries(st.sampled_from(_config_fields()), json_values, max_size=4),
       removed=st.lists(st.sampled_from(_config_fields()), max_size=2))
def test_mutated_configs_load_or_fail_cleanly(fmt, changes, removed):
    data = json.loads(tiny_config(fmt).to_json())
    data.update(changes)
    for name in removed:
        data.pop(name, None)
    try:
        config = PLTConfig.from_dict(data)
    except PLTError:
        return
    # a config that loads supports everything the backends derive from it
    assert 1 <= config.window <= config.max_position_embeddings
    assert all(math.isfinite(float(x)) for x in (config.emb_scale, config.hidden_scale,
                                                 config.rms_norm_eps, config.rope_theta))
    assert checkpoint.expected_shapes(config)
    assert config.resolve_loops(None) >= 1


@FUZZ
@given(text=st.one_of(st.binary(max_size=200),
                      json_values.map(lambda v: json.dumps(v).encode()),
                      st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n)))
def test_arbitrary_config_files_load_or_fail_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz-config.json"
    path.write_bytes(text)
    try:
        PLTConfig.from_file(path)
    except PLTError:
        pass


# ---- safetensors headers --------------------------------------------------------------------------
SMALL = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=8, vocab_size=16)
DTYPES = ["F32", "F16", "BF16", "F64", "I16", "I32", "U8", "BOOL", "Q4", "", None]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """(model dir, header, data bytes) of a tiny valid checkpoint the fuzzer rewrites."""
    model_dir = save_random_model(tmp_path_factory.mktemp("fuzz") / "m", tiny_config(**SMALL))
    path = os.path.join(model_dir, checkpoint.SINGLE_FILE)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header, data = json.loads(f.read(n)), f.read()
    return model_dir, header, data


header_changes = st.lists(st.tuples(
    st.integers(0, 100),  # which entry
    st.sampled_from(["dtype", "shape", "data_offsets", "delete", "duplicate", "junk"]),
    st.one_of(st.sampled_from(DTYPES), json_values,
              st.lists(st.integers(-4, 4096), min_size=0, max_size=3))), max_size=3)


@FUZZ
@given(changes=header_changes,
       data_delta=st.integers(-64, 64),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=2))
def test_mutated_safetensors_load_or_fail_cleanly(small_model, changes, data_delta,
                                                  length_delta, flips):
    model_dir, header, data = small_model
    header = {k: dict(v) if isinstance(v, dict) else v for k, v in header.items()}
    names = sorted(k for k in header if k != "__metadata__")
    duplicate = None
    for index, kind, value in changes:
        name = names[index % len(names)]
        if kind == "delete":
            header.pop(name, None)
        elif kind == "duplicate":
            duplicate = name
        elif kind == "junk":
            header[name] = value
        elif isinstance(header.get(name), dict):
            header[name][kind] = value
    text = json.dumps(header)
    if duplicate is not None and duplicate in header:
        text = text[:-1] + f", {json.dumps(duplicate)}: {json.dumps(header[duplicate])}}}"
    blob = bytearray(text.encode())
    for position, byte in flips:
        if blob:
            blob[position % len(blob)] = byte
    body = data[:len(data) + data_delta] if data_delta < 0 else data + b"\0" * data_delta
    path = os.path.join(model_dir, checkpoint.SINGLE_FILE)
    with open(path, "wb") as f:
        f.write((len(blob) + length_delta).to_bytes(8, "little") + bytes(blob) + body)
    try:
        tensors = checkpoint.load_tensors(model_dir)
    except PLTError:
        return
    assert all(np.isfinite(t).all() for t in tensors.values())
