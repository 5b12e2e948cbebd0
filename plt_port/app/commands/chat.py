"""plt-port chat [--model DIR] [--backend NAME] [--system-prompt TEXT]: a chat REPL with history.

Each stdin line is a user message; the answer streams to stdout, and both join the history,
which the model's chat template renders (a model without one continues the conversation's
text). `/reset` forgets the history, `/quit` or end of input ends the chat. Works the same
with stdin from a pipe or a file.
"""

from __future__ import annotations

import sys

from plt_port.app.commands.generate import add_model_arguments, load_model, system_messages
from plt_port.errors import PLTError

PROMPT = ">> "


def add_arguments(parser):
    add_model_arguments(parser)


def read_line(interactive: bool) -> str | None:
    """The next line of stdin without its newline (None at end of input)."""
    if interactive:
        print(PROMPT, end="", flush=True)
    line = sys.stdin.buffer.readline()
    if not line:
        return None
    return line.decode("utf-8", "surrogateescape").rstrip("\r\n")


def answer(backend, tokenizer, sampling, messages: list[dict], args) -> str:
    """Stream the reply to `messages` to stdout and return it."""
    from runtimes.generate import chat_prompt_ids, stream_generate

    ids = chat_prompt_ids(tokenizer, messages)
    room = backend.config.max_position_embeddings - len(ids) + 1
    if room < 1:
        raise PLTError(f"the conversation ({len(ids)} tokens) fills the model's context; "
                       f"/reset starts a new one")
    pieces = []
    for response in stream_generate(backend, tokenizer, ids,
                                    max_new_tokens=min(args.max_new_tokens, room),
                                    sampling=sampling, stop=args.stop, decode_mode=args.decode,
                                    add_bos=False):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        pieces.append(response.text)
    sys.stdout.write("\n")
    return "".join(pieces)


def run(args):
    backend, tokenizer, sampling = load_model(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("plt-port chat: /reset forgets the conversation, /quit or Ctrl-D ends it",
              file=sys.stderr)
    messages = system_messages(args)
    while (line := read_line(interactive)) is not None:
        command = line.strip()
        if command == "/quit":
            break
        if command == "/reset":
            messages = system_messages(args)
            print("[conversation reset]", file=sys.stderr)
            continue
        if not command:
            continue
        turn = messages + [{"role": "user", "content": line}]
        try:
            reply = answer(backend, tokenizer, sampling, turn, args)
        except PLTError as exc:  # this turn fails, the chat goes on
            print(f"plt-port chat: error: {exc}", file=sys.stderr)
            continue
        messages = turn + [{"role": "assistant", "content": reply}]
    return 0
