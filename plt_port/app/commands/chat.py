"""plt-port chat [-m DIR|NAME] [--backend NAME] [--system-prompt TEXT]: a chat REPL on the engine.

Each message is a user turn: the reply streams to stdout, a stats line (tokens, tok/s, time
to first token) follows on stderr, and both join the conversation, which the model's chat
template renders (a model without one continues the conversation's text). The model runs on
a `runtimes.engine.BatchEngine`, as under `plt-port serve`.

In a terminal: line editing and a persistent history (HISTORY_FILE), Ctrl-C stops the reply
and keeps the conversation as it was before that message, Ctrl-D ends the chat. A line that
ends with a backslash continues on the next line; lines between two lines of `\"\"\"` are one
message. Commands: see HELP. Works the same with stdin from a pipe or a file.
"""

from __future__ import annotations

import json
import os
import queue
import re
import sys

from plt_port.app.commands.generate import (add_model_arguments, load_model, resolve_model,
                                            sampling_params, speculation_from,
                                            system_messages)
from plt_port.errors import PLTError

PROMPT = ">> "
CONTINUATION = ".. "
BLOCK = '"""'
HISTORY_FILE = os.path.join("~", ".plt_port", "chat_history")
HISTORY_LENGTH = 1000
POLL_S = 0.1
COMMAND = re.compile(r"/[A-Za-z]+")
HELP = f"""commands:
  /help        this text
  /reset       forget the conversation (the system prompt stays)
  /save FILE   write the conversation to FILE as JSON messages ({{"role", "content"}})
  /quit        end the chat (so does Ctrl-D)
input: end a line with \\ to go on with the next one, or put lines between two {BLOCK} lines;
Ctrl-C stops a reply (that turn is dropped, the conversation stays)"""


def add_arguments(parser):
    from .cache_prompt import add_prompt_cache_arguments

    add_model_arguments(parser)
    add_prompt_cache_arguments(parser)


# ---- input -----------------------------------------------------------------------------------
class LineReader:
    """Lines of stdin without their newline (None at the end): through readline, with the
    persistent history, when stdin is a terminal; read as bytes otherwise, so a bad byte is
    one turn's error rather than the end of the chat."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.history_path = os.path.expanduser(HISTORY_FILE)
        if interactive:
            self._load_history()

    def _load_history(self) -> None:
        import readline  # noqa: F401 (input() edits lines once it is imported)

        readline.set_history_length(HISTORY_LENGTH)
        if os.path.exists(self.history_path):
            readline.read_history_file(self.history_path)

    def save_history(self) -> None:
        if self.interactive:
            import readline

            os.makedirs(os.path.dirname(self.history_path), exist_ok=True)
            readline.write_history_file(self.history_path)

    def read(self, prompt: str) -> str | None:
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                return None
        line = sys.stdin.buffer.readline()
        return None if not line else line.decode("utf-8", "surrogateescape").rstrip("\r\n")


def read_message(reader: LineReader) -> str | None:
    """The next message: a line, lines joined by trailing backslashes, or a \"\"\" block."""
    line = reader.read(PROMPT)
    if line is None:
        return None
    if line.strip() == BLOCK:
        lines = []
        while (line := reader.read(CONTINUATION)) is not None and line.strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        if (line := reader.read(CONTINUATION)) is None:
            break
        lines.append(line)
    return "\n".join(lines)


# ---- the conversation ------------------------------------------------------------------------
class Chat:
    def __init__(self, engine, tokenizer, sampling, args):
        self.engine, self.tokenizer, self.sampling, self.args = engine, tokenizer, sampling, args
        self.messages = system_messages(args)

    def command(self, line: str) -> bool:
        """Run a /command; whether the chat goes on."""
        name, _, argument = line.strip().partition(" ")
        if name == "/quit":
            return False
        if name == "/help":
            print(HELP, file=sys.stderr)
        elif name == "/reset":
            self.messages = system_messages(self.args)
            print("[conversation reset]", file=sys.stderr)
        elif name == "/save":
            self.save(argument.strip())
        else:
            raise PLTError(f"unknown command {name}; /help lists them")
        return True

    def save(self, path: str) -> None:
        from plt_port.atomic import atomic_write_text

        if not path:
            raise PLTError("/save needs a file name: /save FILE")
        atomic_write_text(path, json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n")
        print(f"[saved {len(self.messages)} messages to {path}]", file=sys.stderr)

    def turn(self, message: str) -> None:
        """Answer `message`; the turn joins the conversation unless it failed or was stopped."""
        turn = self.messages + [{"role": "user", "content": message}]
        reply = self.reply(turn)
        if reply is not None:
            self.messages = turn + [{"role": "assistant", "content": reply}]

    def reply(self, messages: list[dict]) -> str | None:
        """Stream the reply to `messages` to stdout and return it (None when Ctrl-C stopped it)."""
        from runtimes.engine import Request
        from runtimes.generate import chat_prompt_ids

        ids = chat_prompt_ids(self.tokenizer, messages)
        room = self.engine.backend.config.max_position_embeddings - len(ids) + 1
        if room < 1:
            raise PLTError(f"the conversation ({len(ids)} tokens) fills the model's context; "
                           f"/reset starts a new one")
        events: queue.Queue = queue.Queue()
        request = Request(ids, min(self.args.max_new_tokens, room), events.put, self.sampling,
                          self.args.stop, decode_mode=self.args.decode)
        self.engine.submit(request)
        pieces, event = [], None
        try:
            while event is None or event.finish_reason is None:
                try:
                    event = events.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if isinstance(event, BaseException):
                    raise event
                sys.stdout.write(event.text)
                sys.stdout.flush()
                pieces.append(event.text)
        except KeyboardInterrupt:
            request.cancel()
            print("\n[reply stopped; this turn is dropped]", file=sys.stderr)
            return None
        sys.stdout.write("\n")
        print(turn_stats(event), file=sys.stderr)
        return "".join(pieces)


def turn_stats(event) -> str:
    stats = event.stats
    decode_tokens = event.index - 1
    tps = f"{decode_tokens / stats.decode_s:.1f} tok/s" if decode_tokens and stats.decode_s \
        else "- tok/s"
    speculative = f", {stats.speculative.line()}" if stats.speculative is not None else ""
    return (f"[{event.index} tokens, {tps}, TTFT {stats.ttft_s * 1e3:.0f} ms, "
            f"finish: {event.finish_reason}{speculative}]")


def run(args):
    from plt_port.tokenizer import Tokenizer
    from runtimes.engine import BatchEngine

    from .cache_prompt import prompt_cache_from

    resolve_model(args)
    tokenizer = Tokenizer.from_dir(args.model)
    engine = BatchEngine(lambda loops: load_model(args, loops), tokenizer, max_batch=1,
                         max_queue=1, decode_mode=args.decode,
                         prompt_cache=prompt_cache_from(args),
                         speculation=speculation_from(args)).start()
    reader = LineReader(sys.stdin.isatty())
    if reader.interactive:
        print("plt-port chat: /help lists the commands, Ctrl-C stops a reply, Ctrl-D ends",
              file=sys.stderr)
    chat = Chat(engine, tokenizer, sampling_params(args, engine.backend), args)
    try:
        while True:
            try:
                message = read_message(reader)
            except KeyboardInterrupt:  # at the prompt: a fresh line, as in Python's REPL
                print(file=sys.stderr)
                continue
            if message is None:
                break
            try:
                if COMMAND.fullmatch(message.strip().partition(" ")[0]):
                    if not chat.command(message):
                        break
                elif message.strip():
                    chat.turn(message)
            except (PLTError, OSError) as exc:  # this turn fails, the chat goes on
                print(f"plt-port chat: error: {exc}", file=sys.stderr)
    finally:
        reader.save_history()
        engine.close()
    return 0
