"""Chat templates on the command line: `plt-port generate` wraps the prompt as a user message
when the model has a template (`--system-prompt`, `--ignore-chat-template`), and
`plt-port chat` is a REPL on the engine: conversation history, `/help`, `/reset`, `/save`,
`/quit`, multi-line input, a stats line per reply, Ctrl-C that stops only the reply, and in a
terminal line editing with a persistent history."""

from __future__ import annotations

import io
import json
import os
import re

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


def test_chat_commands_multi_line_input_and_stats(chat_model, capsys, monkeypatch, tmp_path):
    """/help and unknown commands never reach the model; a backslash and a \"\"\" block make
    multi-line messages; /save writes the conversation as JSON messages; a stats line follows
    every reply."""
    saved = tmp_path / "conversation.json"
    lines = ("/help\n/unknown\nfirst \\\nline\n\"\"\"\nblock one\nblock two\n\"\"\"\n"
             f"/save {saved}\n/quit\n")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    assert main(["chat", "--model", chat_model, "--max-tokens", "4", "--system-prompt", "S"]) == 0
    captured = capsys.readouterr()
    assert "/save FILE" in captured.err and "unknown command /unknown" in captured.err
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "first \nline"
    assert messages[3]["content"] == "block one\nblock two"
    assert captured.out == "".join(m["content"] + "\n" for m in messages[2::2])
    assert len(re.findall(r"\[4 tokens, [\d.]+ tok/s, TTFT \d+ ms, finish: length\]",
                          captured.err)) == 2


class InterruptingStdout(io.StringIO):
    """A terminal where Ctrl-C arrives while the first reply streams."""

    interrupted = False

    def write(self, text):
        if text and not InterruptingStdout.interrupted:
            InterruptingStdout.interrupted = True
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(chat_model, capsys, monkeypatch,
                                                          tmp_path):
    """The interrupted turn is dropped; the chat goes on with the conversation before it, so
    the next message gets the reply it gets as the first turn."""
    saved = tmp_path / "after.json"
    first_alone = chat(capsys, monkeypatch, chat_model, "a = 1\n")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(
        f"b = 2\na = 1\n/save {saved}\n".encode())))
    monkeypatch.setattr("sys.stdout", InterruptingStdout())
    assert main(["chat", "--model", chat_model, "--max-new-tokens", "5"]) == 0
    assert "[reply stopped; this turn is dropped]" in capsys.readouterr().err
    messages = json.loads(saved.read_text())
    assert messages == [{"role": "user", "content": "a = 1"},
                        {"role": "assistant", "content": first_alone[0]}]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a pseudo-terminal")
def test_terminal_chat_edits_lines_and_keeps_history(chat_model, tmp_path):
    """In a terminal: arrow keys edit the line (readline), and the history persists in
    ~/.plt_port/chat_history."""
    import pty
    import select
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    home.mkdir()
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "plt_port.app.cli", "chat", "-m",
                                chat_model, "--max-tokens", "3"], stdin=follower,
                               stdout=follower, stderr=follower, cwd=tmp_path,
                               env={**os.environ, "HOME": str(home), "TERM": "xterm"})
    os.close(follower)
    output = b""

    def expect(marker: bytes, timeout: float = 60) -> None:
        """Read the terminal up to `marker` (a line typed before readline waits for it would
        be read in cooked mode)."""
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.1)[0]:
                output += os.read(leader, 4096)
        assert marker in output, output[-2000:]
        output = output.split(marker, 1)[1]

    try:
        expect(b">> ")
        os.write(leader, b"ab\x1b[DX\r")  # type ab, one left, X: "aXb"
        expect(b"finish: length")
        expect(b">> ")
        os.write(leader, b"/save saved.json\r")
        expect(b"[saved")
        expect(b">> ")
        os.write(leader, b"\x04")  # Ctrl-D
        assert process.wait(60) == 0
    finally:
        process.kill()
        os.close(leader)
    assert json.loads((tmp_path / "saved.json").read_text())[0]["content"] == "aXb"
    history = (home / ".plt_port" / "chat_history").read_text().splitlines()
    assert history[-2:] == ["aXb", "/save saved.json"]
