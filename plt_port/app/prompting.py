"""From an API's messages to prompt ids, the same way for both APIs.

The conversation is handed to the chat template in the shapes Hugging Face's
`apply_chat_template(messages, tools=...)` documents (OpenAI's): `{"role", "content"}` turns
with roles system / user / assistant / tool, assistant turns with `tool_calls` (`{"id",
"type": "function", "function": {"name", "arguments": {...}}}`, arguments as an object) and
`reasoning_content`, tool turns with `tool_call_id` (and the called function's `name`), and
`tools` as OpenAI function tools. Each API converts its own request into these shapes.

A template that never reads `tools` has no format the model learnt to call tools in: a
request with tools gets a 400 saying so (rather than a made-up format the parsers would
then have to guess); `plt-port serve --chat-template FILE` gives such a model one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtimes.generate import chat_prompt_ids

from .service import bad_request

RESERVED_TEMPLATE_VARIABLES = {"messages", "tools", "add_generation_prompt"}


@dataclass
class ChatPrompt:
    ids: list[int]
    text: str          # the rendered prompt (a reasoning block it opens is read as such)


def joined_text(texts: Sequence[str]) -> str:
    """Several text parts of one turn, as one string (vLLM's join)."""
    return "\n".join(texts)


def not_text(param: str, kind: str):
    kind = "images" if "image" in kind else f"{kind!r} parts"
    return bad_request(param, f"{kind} are not supported: this model reads text only")


def tool_call_turn(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def name_tool_results(messages: list[dict]) -> list[dict]:
    """Give each tool turn the `name` of the call it answers (templates that print it)."""
    names = {call["id"]: call["function"]["name"] for m in messages
             for call in m.get("tool_calls") or ()}
    return [m | {"name": names[m["tool_call_id"]]}
            if m["role"] == "tool" and "name" not in m and m.get("tool_call_id") in names else m
            for m in messages]


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None,
                template_kwargs: dict | None = None, tools_param: str = "tools",
                kwargs_param: str = "chat_template_kwargs") -> ChatPrompt:
    template_kwargs = template_kwargs or {}
    reserved = RESERVED_TEMPLATE_VARIABLES & set(template_kwargs)
    if reserved:
        raise bad_request(kwargs_param, f"{', '.join(sorted(reserved))} are set by the "
                                        f"server, not by the request")
    if tools and not tokenizer.chat_template_has_tools:
        raise bad_request(tools_param, "this model's chat template has no tool support (it "
                                       "never reads `tools`); serve it with --chat-template "
                                       "FILE of a template that does")
    if not tokenizer.chat_template:
        if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            raise bad_request("messages", "tool calls and tool results need a chat template; "
                                          "this model has none")
        if template_kwargs:
            raise bad_request(kwargs_param, "this model has no chat template")
        ids = chat_prompt_ids(tokenizer, messages)
        return ChatPrompt(ids, "".join(m["content"] for m in messages))
    text = tokenizer.apply_chat_template(name_tool_results(messages), tools or None,
                                         **template_kwargs)
    return ChatPrompt(tokenizer.encode_rendered_chat(text), text)
