"""Chat templates on the command line: `plt-port generate` wraps the prompt as a user message
when the model has a template (`--system-prompt`, `--ignore-chat-template`), and
`plt-port chat` is a REPL over stdin lines with history, `/reset` and `/quit`."""

from __future__ import annotations

import io
import json
import os

import pytest

from plt_port.app.cli import main
from plt_port.tokenizer import Tokenizer

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture
def chat_model(make_model):
    model_dir = make_model("plt", eos_token_id=None)
    path = os.path.join(model_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "chat_template": TEMPLATE, "add_bos_token": False}, f)
    return model_dir


def run_cli(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_generate_applies_the_chat_template(chat_model, capsys):
    templated = run_cli(capsys, "generate", "--model", chat_model, "--max-new-tokens", "6",
                        "--system-prompt", "Be brief.", "def f():")
    rendered = Tokenizer.from_dir(chat_model).apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f():"}])
    assert templated == run_cli(capsys, "generate", "--model", chat_model, "--max-new-tokens",
                                "6", "--ignore-chat-template", rendered)
    plain = run_cli(capsys, "generate", "--model", chat_model, "--max-new-tokens", "6",
                    "--ignore-chat-template", "def f():")
    assert plain != templated


def test_system_prompt_without_a_template_is_one_clear_error(chat_model, capsys):
    assert main(["generate", "--model", chat_model, "--ignore-chat-template",
                 "--system-prompt", "x", "y"]) == 1
    assert "--system-prompt needs the model's chat template" in capsys.readouterr().err


def chat(capsys, monkeypatch, model_dir, lines: str, *flags) -> list[str]:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    return run_cli(capsys, "chat", "--model", model_dir, "--max-new-tokens", "5",
                   *flags).splitlines()


def test_chat_keeps_history_resets_and_quits(chat_model, capsys, monkeypatch):
    """A reply to a line depends on the turns before it; after /reset it is the first turn's
    reply again; /quit ends the chat (the lines after it are never read)."""
    generated = run_cli(capsys, "generate", "--model", chat_model, "--max-new-tokens", "5",
                        "--system-prompt", "S", "a = 1")
    first, second, again = chat(capsys, monkeypatch, chat_model,
                                "a = 1\na = 1\n/reset\na = 1\n/quit\nb = 2\n",
                                "--system-prompt", "S")
    assert first == again == generated.removesuffix("\n")
    assert second != first


def test_chat_ends_at_end_of_input_and_survives_a_bad_line(make_model, capsys, monkeypatch):
    model_dir = make_model("plt", eos_token_id=None)  # no chat template: the text continues
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"x\xff\nx = 1\n")))
    assert main(["chat", "--model", model_dir, "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "not valid UTF-8" in captured.err
    assert captured.out.endswith("\n")  # the good line was answered
