"""Hostile files and options (issue 26, classes 4-11 outside the server): thread counts past
the cores, broken config.json of `export mlx`, chat templates that build huge strings or
recurse, tokenizer files that panic the Rust library or carry wrong types, mlx-community dirs
with wrong quantization types, ONNX exports that disagree with themselves, full disks. Each
ends in one clear PLTError (CLI: one error line), never a traceback, a hang or garbage."""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import community_checkpoint, requires
from test_hostile_inputs import DEEP_JSON, cli_error, no_hang  # noqa: F401 (no_hang: a fixture)
from plt_port.errors import PLTError

CORES = len(os.sched_getaffinity(0))


# ---- 4. thread counts bounded by the cores ------------------------------------------------------
@pytest.mark.parametrize("command", [["generate", "x"], ["chat"], ["serve"], ["bench"],
                                     ["eval"], ["train"], ["demo"]])
def test_threads_past_the_cores_are_a_usage_error(command, capsys):
    from plt_port.app.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command[0], "--threads", str(CORES + 1), *command[1:]])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"from 1 to {CORES}" in err


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_backend_threads_accept_exactly_the_cores(backend, make_model):
    from runtimes.backends import BackendError, load_backend

    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    model_dir = make_model("plt")
    load_backend(backend, model_dir, threads=CORES)
    with pytest.raises(BackendError, match=f"threads must be an integer from 1 to {CORES}"):
        load_backend(backend, model_dir, threads=CORES + 1)


# ---- 5. export mlx reads config.json through the one JSON reader ---------------------------------
@requires("mlx")
@pytest.mark.parametrize("content,message", [
    ("{bad", "unreadable JSON"), ("5", "expected a JSON object"), (DEEP_JSON, "nested too deeply"),
    (b"{\"a\": \"\xff\"}", "unreadable JSON"), (None, "not a regular file")])
def test_export_mlx_refuses_a_broken_config_cleanly(make_model, tmp_path, content, message,
                                                    capsys, no_hang):  # noqa: F811
    model_dir = make_model()
    path = os.path.join(model_dir, "config.json")
    os.remove(path)
    if content is None:
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
    line = cli_error(["export", "mlx", model_dir, str(tmp_path / "out")], capsys)
    assert message in line and "config.json" in line
    assert not os.path.exists(tmp_path / "out")


# ---- 6. chat templates: output size, recursion, the list form ------------------------------------
GROWING_TEMPLATES = {
    "~": "{% set ns = namespace(s='x' * 1000) %}{% for i in range(40) %}"
         "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "+": "{% set ns = namespace(s='x' * 1000) %}{% for i in range(40) %}"
         "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "center": "{{ 'x'|center(10 ** 10) }}",
    "format": "{{ '%*s'|format(10 ** 10, 'x') }}",
    "format width": "{{ '%9999999999s' % 'x' }}",
    "str.format": "{{ '{:>99999999999}'.format('x') }}",
    "ljust": "{{ 'x'.ljust(10 ** 10) }}",
    "indent": "{{ ('\n' * 100000)|indent(100000) }}",
    "replace": "{{ ('a' * 100000)|replace('a', 'b' * 100000) }}",
    "join": "{{ (['x' * 100000] * 100000)|join }}",
    "join of a generator": "{{ (['x' * 100000] * 100000)|select|join }}",
    "output": "{% for i in range(90000) %}{{ 'x' * 1000000 }}{% endfor %}",
    "block set": "{% set ns = namespace(s='x' * 1000) %}{% for i in range(40) %}"
                 "{% set b %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = b %}{% endfor %}",
    "string of references": "{{ (['x' * 1000000] * 100000)|string }}",
    "lipsum": "{{ lipsum(10000000) }}",
    "slices": "{% set s = 'x' * 1000000 %}{% for i in range(90000) %}{% set t = s[1:] %}"
              "{% endfor %}",
    "tojson indent": "{{ [[[1]]]|tojson(indent=10 ** 9) }}",
}


@pytest.fixture
def fast_tokenizer(tmp_path):
    from conftest import write_fast_tokenizer
    from plt_port.tokenizer import Tokenizer

    return Tokenizer.from_dir(write_fast_tokenizer(tmp_path / "tok", vocab_size=300))


@pytest.mark.parametrize("name", GROWING_TEMPLATES)
def test_templates_that_build_huge_strings_are_refused(name, fast_tokenizer, no_hang):  # noqa: F811
    from plt_port.tokenizer import TokenizerError

    fast_tokenizer.chat_template = GROWING_TEMPLATES[name]
    with pytest.raises(TokenizerError, match="chat_template: .*(budget|steps|tojson indent)"):
        fast_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_recursive_macro_is_a_template_error(fast_tokenizer):
    from plt_port.tokenizer import TokenizerError

    fast_tokenizer.chat_template = "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}"
    with pytest.raises(TokenizerError, match="recurses too deeply"):
        fast_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_long_legitimate_chat_fits_the_budgets(fast_tokenizer):
    """A chat larger than the fixed budget renders: the size budget grows with the input."""
    from plt_port.chat_template import MAX_TEMPLATE_SIZE

    content = "y" * (MAX_TEMPLATE_SIZE // 4)
    messages = [{"role": "user", "content": content}] * 8
    fast_tokenizer.chat_template = ("{% for m in messages %}{% set text = m.content|trim %}"
                                    "<{{ m.role }}>{{ text ~ '\n' }}{% endfor %}")
    rendered = fast_tokenizer.apply_chat_template(messages)
    assert rendered == "".join(f"<user>{content}\n" for _ in messages)


def test_the_list_of_named_templates_picks_as_hugging_face(tokenizer_dir, tmp_path):
    import shutil

    from plt_port.tokenizer import Tokenizer

    shutil.copytree(tokenizer_dir, tmp_path / "t")
    path = tmp_path / "t" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                               {"name": "tool_use", "template": "T{{ tools|length }}"}]
    path.write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(tmp_path / "t")
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "Dhi"
    assert tokenizer.apply_chat_template(messages, tools=[{"type": "function"}]) == "T1"
    assert tokenizer.chat_template_has_tools
    config["chat_template"] = [{"name": "default", "template": "D"}]
    path.write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path / "t").apply_chat_template(messages, tools=[{}]) == "D"


@pytest.mark.parametrize("value", [5, {"default": "x"}, [{"name": "default"}], ["x"],
                                   [{"name": "a", "template": "x"},
                                    {"name": "a", "template": "y"}]])
def test_a_malformed_chat_template_entry_is_a_clean_error(tokenizer_dir, tmp_path, value):
    import shutil

    from plt_port.tokenizer import Tokenizer, TokenizerError

    shutil.copytree(tokenizer_dir, tmp_path / "t")
    path = tmp_path / "t" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = value
    path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="chat_template"):
        Tokenizer.from_dir(tmp_path / "t")


# ---- 7 and 10. tokenizer files: library panics, wrong types, shared ids, growing normalizers -----
def _fast_dir(tmp_path, edit_spec=None, **config_changes) -> str:
    from conftest import write_fast_tokenizer

    out = write_fast_tokenizer(tmp_path / "tok", vocab_size=300)
    for name, edit in (("tokenizer.json", edit_spec),
                       ("tokenizer_config.json", lambda c: c.update(config_changes))):
        path = os.path.join(out, name)
        with open(path) as f:
            data = json.load(f)
        if edit is not None:
            edit(data)
        with open(path, "w") as f:
            json.dump(data, f)
    return out


def test_a_tokenizers_library_panic_is_a_tokenizer_error(tmp_path):
    from plt_port.tokenizer import Tokenizer, TokenizerError

    def backtracking_split(spec):
        spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"},
                                 "behavior": "Isolated", "invert": False}

    tokenizer = Tokenizer.from_dir(_fast_dir(tmp_path, backtracking_split))
    assert tokenizer.encode("ab")
    with pytest.raises(TokenizerError, match="encoding failed.*PanicException"):
        tokenizer.encode("a" * 50000 + "b")


@pytest.mark.parametrize("changes,message", [
    ({"bos_token": ["<s>"]}, "bos_token must be"),
    ({"eos_token": True}, "eos_token must be"),
    ({"pad_token": 1.5}, "pad_token must be"),
    ({"add_bos_token": "false"}, "add_bos_token must be true or false"),
    ({"add_bos_token": 0}, "add_bos_token must be true or false"),
    ({"added_tokens_decoder": {"300": {"content": 7}}}, "entry '300'"),
    ({"added_tokens_decoder": {"x": {"content": "<a>"}}}, "entry 'x'"),
    ({"added_tokens_decoder": ["<a>"]}, "must be an object"),
])
def test_tokenizer_config_types_are_strict(tmp_path, changes, message):
    from plt_port.tokenizer import Tokenizer, TokenizerError

    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dir(_fast_dir(tmp_path, **changes))


def test_strict_types_still_take_the_legitimate_forms(tmp_path):
    from plt_port.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(_fast_dir(tmp_path, eos_token=["</s>", 0, {"content": "<s>"}],
                                             add_bos_token=False))
    assert tokenizer.eos_ids == [0, 1, 2] and not tokenizer.add_bos_token


def test_vocabulary_entries_sharing_an_id_are_refused(tmp_path):
    from plt_port.tokenizer import Tokenizer, TokenizerError

    def share_ids(spec):
        vocab = spec["model"]["vocab"]
        for token in list(vocab)[100:200]:
            vocab[token] = 100

    with pytest.raises(TokenizerError, match="gives id 100 to both"):
        Tokenizer.from_dir(_fast_dir(tmp_path, share_ids))


@pytest.mark.parametrize("normalizer,refused", [
    ({"type": "Replace", "pattern": {"String": "a"}, "content": "b" * 100}, True),
    ({"type": "Replace", "pattern": {"Regex": ""}, "content": "bb" * 40}, True),
    ({"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"String": "a"},
                                           "content": "aa"}] * 7}, True),
    ({"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}, False),
    ({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}, False),
])
def test_normalizers_that_multiply_text_are_refused(tmp_path, normalizer, refused):
    from plt_port.tokenizer import Tokenizer, TokenizerError

    path = _fast_dir(tmp_path, lambda spec: spec.update(normalizer=normalizer))
    if refused:
        with pytest.raises(TokenizerError, match="normalizer can make text"):
            Tokenizer.from_dir(path)
    else:
        assert Tokenizer.from_dir(path).encode("Ab c")


# ---- 9. mlx-community dirs: integer quantization parameters, mlx-lm's tensor dtypes -------------
@pytest.fixture
def community_dir(make_model, tmp_path):
    """An mlx-lm quantized checkpoint (4 bits, group size 32, no plt-port marker)."""
    pytest.importorskip("mlx.core")
    return community_checkpoint(make_model("plt"), tmp_path / "mlx-4bit")


@pytest.mark.parametrize("key,value", [("bits", 4.0), ("group_size", 32.0), ("bits", True)])
def test_quantization_parameters_must_be_integers(community_dir, key, value):
    from runtimes.backends import load_backend

    path = os.path.join(community_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization"][key] = value
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(PLTError, match=f"{key} must be one of"):
        load_backend("mlx", community_dir)


@pytest.mark.parametrize("suffix,dtype", [("weight", "float32"), ("weight", "int8"),
                                          ("scales", "int32"), ("biases", "uint32")])
def test_quantized_tensors_must_have_mlx_lm_dtypes(community_dir, suffix, dtype):
    import mlx.core as mx

    from runtimes.backends import load_backend

    path = os.path.join(community_dir, "model.safetensors")
    weights = mx.load(path)
    name = f"model.layers.0.self_attn.q_proj.{suffix}"
    weights[name] = weights[name].astype(getattr(mx, dtype))
    mx.save_safetensors(path, weights, metadata={"format": "mlx"})
    with pytest.raises(PLTError, match=f"{name} is {dtype}"):
        load_backend("mlx", community_dir)


# ---- 8 and 10. ONNX exports that disagree with themselves; weights.bin's sha256 ----------------
@pytest.fixture
def onnx_export_dir(make_model, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from exporters.onnx_export import export

    return export(make_model("plt"), str(tmp_path / "export"), loops=2)


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _update_record(export_dir, name):
    """The manifest's size and sha256 of `name` set to the file's (an edit that hides)."""
    from exporters.onnx_export import MANIFEST, file_record

    _edit_json(os.path.join(export_dir, MANIFEST),
               lambda m: m["files"].__setitem__(name, file_record(os.path.join(export_dir, name))))


def _damage(export_dir, damage):
    import numpy as np

    from exporters.onnx_export import MANIFEST

    manifest = os.path.join(export_dir, MANIFEST)
    if damage in ("loops", "dtype"):
        _edit_json(manifest, lambda m: m.update({"loops": 3} if damage == "loops"
                                                else {"dtype": "float16"}))
    elif damage == "random graph":
        with open(os.path.join(export_dir, "model.onnx"), "wb") as f:
            f.write(np.random.default_rng(0).bytes(5000))
        _update_record(export_dir, "model.onnx")
    elif damage == "external data outside":
        import onnx

        path = os.path.join(export_dir, "model.onnx")
        model = onnx.load(path, load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../outside.bin"
        onnx.save(model, path)
        _update_record(export_dir, "model.onnx")
    elif damage == "shuffled weights":
        path = os.path.join(export_dir, "weights.bin")
        data = bytearray(open(path, "rb").read())
        data[:4096], data[4096:8192] = data[4096:8192], data[:4096]
        with open(path, "wb") as f:
            f.write(data)
    else:  # a config.json field, same size (the size check alone would not see it)
        key, value = damage.split("=")
        _edit_json(os.path.join(export_dir, "config.json"), lambda c: c.update({key: int(value)}))
        _update_record(export_dir, "config.json")


@pytest.mark.parametrize("damage,message", [
    ("loops", "does not match config.json"), ("dtype", "does not match config.json"),
    ("random graph", "ONNX Runtime cannot load it"),
    ("external data outside", "ONNX Runtime cannot load it.*escapes"),
    ("shuffled weights", "weights.bin differs"),
    ("num_hidden_layers=3", "num_layers"), ("vocab_size=600", "vocab_size"),
    ("plt_window_size=5", "window"),
])
def test_onnx_exports_that_disagree_with_themselves_are_one_error(onnx_export_dir, damage,
                                                                  message, capsys):
    if damage == "plt_window_size=5":
        damage = None
        _edit_json(os.path.join(onnx_export_dir, "config.json"),
                   lambda c: c.update(plt_window_size=[5, 0]))
        _update_record(onnx_export_dir, "config.json")
    else:
        _damage(onnx_export_dir, damage)
    line = cli_error(["generate", "--model", onnx_export_dir, "--max-tokens", "2", "x"], capsys)
    assert re.search(message, line), line


def test_weights_bin_is_hashed_once_per_file_version(onnx_export_dir, monkeypatch):
    from exporters import onnx_export

    hashed = []
    record = onnx_export.file_record
    monkeypatch.setattr(onnx_export, "file_record",
                        lambda path: hashed.append(path) or record(path))
    monkeypatch.setattr(onnx_export, "_VERIFIED", {})
    weights = os.path.join(onnx_export_dir, "weights.bin")
    for _ in range(3):
        onnx_export.check_export(onnx_export_dir)
    assert hashed.count(weights) == 1
    os.utime(weights, ns=(0, 0))  # a new mtime: read again
    onnx_export.check_export(onnx_export_dir)
    assert hashed.count(weights) == 2


# ---- 11. full disks, generation_config.json named ---------------------------------------------
@requires("mlx")
@pytest.mark.parametrize("failure", ["short weights file", "save raises", "config.json ENOSPC"])
def test_export_mlx_into_a_full_disk_is_one_error(make_model, tmp_path, monkeypatch, capsys,
                                                  failure):
    import builtins
    import errno

    import mlx.core as mx

    model_dir = make_model()
    save = mx.save_safetensors

    def short_save(path, weights, metadata=None):
        save(path, weights, metadata=metadata)
        os.truncate(path, os.path.getsize(path) // 2)

    def failing_save(path, weights, metadata=None):
        raise RuntimeError("[save_safetensors] Failed to write")

    real_open = builtins.open

    def full_open(path, mode="r", *args, **kwargs):
        if "w" in mode and os.fspath(path).endswith("config.json"):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
        return real_open(path, mode, *args, **kwargs)

    if failure == "config.json ENOSPC":
        monkeypatch.setattr(builtins, "open", full_open)
    else:
        monkeypatch.setattr(mx, "save_safetensors",
                            short_save if failure == "short weights file" else failing_save)
    line = cli_error(["export", "mlx", model_dir, str(tmp_path / "out")], capsys)
    assert ("[Errno 28]" if failure == "config.json ENOSPC" else "is the disk full") in line
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 2.0), ("top_k", -3),
                                         ("min_p", 1.5), ("repetition_penalty", 0)])
def test_generation_config_values_are_refused_naming_the_file(make_model, field, value, capsys):
    model_dir = make_model()
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, field: value}, f)
    line = cli_error(["generate", "--model", model_dir, "--max-tokens", "2", "x"], capsys)
    assert "generation_config.json" in line and field in line
