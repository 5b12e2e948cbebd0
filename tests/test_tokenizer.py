import importlib.util
import json
import shutil

import pytest

from plt_port.tokenizer import Tokenizer, TokenizerError

CODE_SAMPLES = [
    "def f(x):\n    if x:\n        return x  # comment\n\n\n    return None\n",
    "\tindented\twith\ttabs\n\t\t\n  \n",
    "s = 'héllo wörld — ünïcode 中文 🐍'\nprint(s)\n",
    "    leading spaces and trailing   \n",
    "x=1;y=2\r\nwindows\r\n",
    "",
    "\n\n\n",
    "class A:\n    '''doc'''\n    pass\n" * 3,
]


@pytest.mark.parametrize("text", CODE_SAMPLES)
def test_code_round_trips_exactly(tokenizer_dir, text):
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_stdlib_file_round_trips(tokenizer_dir):
    import inspect
    import json as module

    tok = Tokenizer.from_dir(tokenizer_dir)
    text = inspect.getsource(module)
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_from_config(tokenizer_dir, tmp_path):
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"512": {"content": "<|im_end|>"},
                                      "513": {"content": "<|im_start|>"}}
    config["eos_token"] = ["</s>", "<|im_end|>"]
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path / "t")
    assert tok.bos_id == 1 and tok.pad_id == 3 and tok.eos_ids == [2, 512]
    assert tok.vocab_size == 514
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_bos=True)
    assert ids[0] == 1 and ids[1] == 513 and ids[-1] == 512
    assert tok.decode(ids[1:]) == "<|im_start|>user\nhi<|im_end|>"


def test_added_tokens_match_the_longest_first(tokenizer_dir, tmp_path):
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"512": {"content": "<x>"}, "513": {"content": "<x>y"}}
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path / "t")
    assert tok.encode("a<x>y b") == tok.encode("a") + [513] + tok.encode(" b")
    assert tok.encode("<x>z")[0] == 512


def test_unknown_special_token_is_an_error(tokenizer_dir, tmp_path):
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="<nope>"):
        Tokenizer.from_dir(tmp_path / "t")


def test_missing_model_file(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.model and no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_streaming_never_emits_broken_utf8(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    text = "x = '🐍中文é'  # ✓\n\tdone\n"
    ids = tok.encode(text)
    assert any(tok.sp.is_byte(i) for i in ids)  # multi-byte chars go through byte fallback
    detok = tok.detokenizer()
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # a character split across tokens is held back until complete
    snake = [i for i in ids if tok.sp.is_byte(i)][:4]
    detok = tok.detokenizer()
    assert [detok.add(i) for i in snake] == ["", "", "", "🐍"]


def test_incomplete_tail_is_flushed_as_replacement(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    first_byte_of_snake = tok.sp.piece_to_id("<0xF0>")
    detok = tok.detokenizer()
    assert detok.add(first_byte_of_snake) == ""
    assert detok.flush() == "\ufffd"


@pytest.mark.parametrize("flag,expected", [(None, True), (True, True), (False, False)])
def test_add_bos_token_follows_the_config(tokenizer_dir, tmp_path, flag, expected):
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    path = tmp_path / "t" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("add_bos_token", None)
    if flag is not None:
        config["add_bos_token"] = flag
    path.write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path / "t").add_bos_token is expected


def test_chat_template_is_sandboxed(tokenizer_dir, tmp_path):
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    path = tmp_path / "t" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = "{{ cycler.__init__.__globals__.os.popen('echo owned').read() }}"
    path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="chat_template"):
        Tokenizer.from_dir(tmp_path / "t").apply_chat_template([{"role": "user", "content": "x"}])
    config["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    path.write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path / "t")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi"


@pytest.mark.parametrize("name,content,message", [
    ("tokenizer_config.json", b"{broken", "unreadable JSON"),
    ("tokenizer_config.json", b"\xff\xfe", "unreadable JSON"),
    ("tokenizer_config.json", b'{"added_tokens_decoder": {"x": {"content": "a"}}}', "added_tokens"),
    ("tokenizer_config.json", b'{"added_tokens_decoder": {"600": {"content": ""}}}', "empty"),
    ("tokenizer.model", b"garbage", "not a sentencepiece model"),
])
def test_broken_tokenizer_files(tokenizer_dir, tmp_path, name, content, message):
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    (tmp_path / "t" / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dir(tmp_path / "t")


def test_ids_past_the_sentencepiece_vocabulary_decode_to_nothing(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    assert tok.decode([tok.encode("x")[0], 100_000]) == "x"


def test_tokenizer_training_failure_is_a_clear_error(tmp_path):
    from plt_port.tokenizer import train_tokenizer

    corpus = tmp_path / "c.py"
    corpus.write_text("x = 1\n" * 50)
    with pytest.raises(TokenizerError, match="vocab_size=5"):
        train_tokenizer([str(corpus)], str(tmp_path / "t"), vocab_size=5)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs the optional package 'transformers'")
def test_chat_templates_render_as_hugging_face_renders_them(tokenizer_dir):
    """What HF's chat templates lean on: trim_blocks/lstrip_blocks, loop controls, a tojson
    that keeps `<` and unicode, the special token strings, extra variables, the
    {% generation %} tag, raise_exception; compared with transformers' own renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ("{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'stop' %}{% break %}"
                "{% endif %}\n  {% generation %}<{{ m.role }}>{{ m.content | tojson }}"
                "{% endgeneration %}\n{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
                "{% if enable_thinking %}<think>{% endif %}")
    tok = Tokenizer.from_dir(tokenizer_dir)
    tok.chat_template = template
    messages = [{"role": "user", "content": "a < b, é"}, {"role": "stop", "content": ""},
                {"role": "user", "content": "never"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "<x> ü"}}]
    ours = tok.apply_chat_template(messages, tools, enable_thinking=True)
    theirs, _ = render_jinja_template(conversations=[messages], tools=tools,
                                      chat_template=template, add_generation_prompt=True,
                                      enable_thinking=True, **tok.special_token_strings())
    assert ours == theirs[0] and "a < b, é" in ours and "<think>" in ours
    tok.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(TokenizerError, match="no system role"):
        tok.apply_chat_template(messages)
