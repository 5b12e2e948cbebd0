"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

The request (anthropic-python's `message_create_params`) becomes the same template messages,
tools and parsers as an OpenAI chat (`prompting.py`, `assistant_output.py`): `system`;
`text`, `tool_use`, `tool_result` and `thinking` blocks; custom `tools` (`strict` too);
`tool_choice` auto, none, any, a named tool and `disable_parallel_tool_use`; structured
output (`output_config.format`, a JSON schema: strict, as Anthropic's is); forced output
becomes a grammar in `assistant_output.forced_output`; `stop_sequences`; `max_tokens`; and
`temperature`, `top_p`, `top_k` (in the API before, still sent by clients), and the
sampling extras of the OpenAI routes (`service.SamplingFields`: seed, penalties,
logit_bias, min_p, ...). The answer comes back as `thinking`, `text` and `tool_use` blocks
with `stop_reason` end_turn, max_tokens, stop_sequence or tool_use and the usage (with the
OpenAI routes' `speculative` extra from a speculating server); streamed
as message_start, content_block_start / content_block_delta (text_delta, thinking_delta,
input_json_delta) / content_block_stop per block, message_delta and message_stop. Errors on
these routes are Anthropic's error JSON.

Labels and hints that change nothing (metadata, cache_control, service_tier, speed,
inference_geo, the ids of user profiles and workspaces) are accepted; `redacted_thinking`
blocks (opaque, written for another model) are accepted and skipped; a `tool_result` with
`is_error` reaches the template as "Error: " and its text; a tool's `input_examples` are
refused. `thinking` enabled/adaptive/
disabled sets the template variable `enable_thinking` (Qwen3's); its budget is not enforced
(max_tokens bounds the whole answer).
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from runtimes.engine import TokenEvent
from runtimes.grammar import AnswerFormat, json_answer

from .assistant_output import AnswerReader, ForcedOutput, Part, forced_output
from .prompting import joined_text, not_text, render_chat, tool_call_turn
from .service import MAX_MESSAGES, APIError, ChoiceEvent, SamplingFields, Service, Strict, \
    bad_request, event_stream, items, mapping, matched_stop, off_loop, stop_strings, \
    whole_response

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 499: "invalid_request_error", 529: "overloaded_error"}


def error_body(error: APIError) -> dict:
    message = error.message
    return {"type": "error", "error": {"type": ERROR_TYPES.get(error.status, "api_error"),
                                       "message": message}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status)


# ---- request bodies ------------------------------------------------------------------------------
class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: dict | None = None
    citations: list | None = None


class OtherBlock(BaseModel):
    """Images, documents and server tool blocks (refused: text and custom tools only)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image", "document", "search_result", "server_tool_use",
                  "web_search_tool_result", "web_fetch_tool_result",
                  "code_execution_tool_result", "bash_code_execution_tool_result",
                  "text_editor_code_execution_tool_result", "tool_search_tool_result",
                  "container_upload", "tool_reference"]


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: mapping(Any)
    cache_control: dict | None = None
    caller: dict | None = None
    toolset_name: str | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | items(Annotated[TextBlock | OtherBlock, Field(discriminator="type")]) = ""
    is_error: bool | None = None
    cache_control: dict | None = None
    toolset_name: str | None = None


class ThinkingBlock(Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock |
                  RedactedThinkingBlock | OtherBlock, Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant", "system"]
    content: str | items(Block)


class Tool(Strict):
    name: str
    input_schema: mapping(Any)
    description: str | None = None
    type: Literal["custom"] | None = None
    strict: bool | None = None
    cache_control: dict | None = None
    eager_input_streaming: bool | None = None
    defer_loading: Literal[False] | None = None
    allowed_callers: items(Literal["direct"]) | None = None
    input_examples: list | None = None


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class OutputConfig(Strict):
    effort: str | None = None
    format: OutputFormat | None = None


class CountTokensBody(Strict):
    model: str
    messages: items(Message, MAX_MESSAGES)
    system: str | items(TextBlock) | None = None
    tools: items(Tool) | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    cache_control: dict | None = None
    output_config: OutputConfig | None = None
    speed: Literal["standard", "fast"] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class MessagesBody(CountTokensBody, SamplingFields):
    """Anthropic's fields, with temperature, top_p and top_k (sent by clients of the API
    before) and the sampling extras both APIs take here (`service.SamplingFields`)."""

    max_tokens: int
    stop_sequences: items(str) | None = None
    stream: bool | None = None
    metadata: dict | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: str | None = None
    loops: int | None = None  # this server's loop count (extra_body)
    container: Any = None
    diagnostics: Any = None


REFUSED_FIELDS = {"container": "containers (server tools) are not supported",
                  "diagnostics": "prompt-cache diagnostics are not supported"}


# ---- the conversation ----------------------------------------------------------------------------
def block_text(blocks, param: str) -> str:
    if isinstance(blocks, str):
        return blocks
    texts = []
    for k, block in enumerate(blocks):
        if not isinstance(block, TextBlock):
            raise not_text(f"{param}.{k}", block.type)
        if block.citations:
            raise bad_request(f"{param}.{k}.citations", "citations are not supported")
        texts.append(block.text)
    return joined_text(texts)


def template_messages(body: CountTokensBody) -> list[dict]:
    """The request as the chat template reads it (`prompting.py`)."""
    if not body.messages:
        raise bad_request("messages", "must not be empty")
    turns = [{"role": "system", "content": block_text(body.system, "system")}] \
        if body.system else []
    for i, message in enumerate(body.messages):
        turns += message_turns(message, f"messages.{i}.content")
    return turns


def message_turns(message: Message, param: str) -> list[dict]:
    """One message's turns: its text (and calls, thinking) as one turn; each tool_result of
    a user message as a tool turn of its own, where it stands."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    turns, texts, calls, thinking = [], [], [], []

    def flush_text():
        if texts:
            turns.append({"role": message.role, "content": joined_text(texts)})
            texts.clear()

    for k, block in enumerate(message.content):
        where = f"{param}.{k}"
        if isinstance(block, TextBlock):
            texts.append(block_text([block], param))
        elif isinstance(block, ToolResultBlock) and message.role == "user":
            flush_text()
            text = block_text(block.content, f"{where}.content")
            turns.append({"role": "tool", "tool_call_id": block.tool_use_id,
                          "content": f"Error: {text}" if block.is_error else text})
        elif isinstance(block, ToolUseBlock) and message.role == "assistant":
            calls.append(tool_call_turn(block.id, block.name, block.input))
        elif isinstance(block, ThinkingBlock) and message.role == "assistant":
            thinking.append(block.thinking)
        elif isinstance(block, RedactedThinkingBlock) and message.role == "assistant":
            continue
        elif isinstance(block, OtherBlock):
            raise not_text(where, block.type)
        else:
            raise bad_request(f"{where}.type", f"a {block.type} block cannot be in a "
                                               f"{message.role} message")
    if message.role != "assistant":
        flush_text()
        return turns
    turn = {"role": "assistant", "content": joined_text(texts)}
    if calls:
        turn["tool_calls"] = calls
    if thinking:
        turn["reasoning_content"] = joined_text(thinking)
    return [turn]


def template_tools(body: CountTokensBody) -> list[dict] | None:
    """Custom tools as OpenAI function tools (the shape chat templates read)."""
    if not body.tools:
        return None
    for i, tool in enumerate(body.tools):
        if tool.input_examples is not None:
            raise bad_request(f"tools.{i}.input_examples", "tool input examples are not "
                                                          "supported")
    return [{"type": "function", "function": {"name": tool.name,
                                              "description": tool.description or "",
                                              "parameters": tool.input_schema}}
            for tool in body.tools]


TOOL_CHOICES = {"auto": "auto", "none": "none", "any": "required"}


def forced(body: MessagesBody) -> ForcedOutput:
    """The request's tool_choice, strict tools and output format, in OpenAI's terms."""
    choice = body.tool_choice
    tool_choice = None if choice is None else TOOL_CHOICES.get(choice.type)
    if choice is not None and choice.type == "tool":
        if not choice.name:
            raise bad_request("tool_choice.name", "a tool choice of type tool names the tool")
        tool_choice = {"type": "function", "function": {"name": choice.name}}
    tools = [{"type": "function", "function": {"name": tool.name,
                                               "parameters": tool.input_schema,
                                               "strict": bool(tool.strict)}}
             for tool in body.tools or ()]
    return ForcedOutput(tools, tool_choice,
                        parallel=not (choice is not None and choice.disable_parallel_tool_use),
                        answer=output_format(body), tool_schema_param="tools.{}.input_schema",
                        answer_param="output_config.format")


def output_format(body: MessagesBody) -> AnswerFormat | None:
    """Anthropic's structured output (`output_config.format`: {"type": "json_schema",
    "schema": {...}}), strict as Anthropic's is."""
    spec = body.output_config.format if body.output_config is not None else None
    if spec is None:
        return None
    schema = (spec.model_extra or {}).get("schema")
    if spec.type != "json_schema" or not isinstance(schema, dict) or \
            set(spec.model_extra) != {"schema"}:
        raise bad_request("output_config.format", 'must be {"type": "json_schema", "schema": '
                                                  '{...}}')
    return json_answer(schema, strict=True)


def template_kwargs(body: CountTokensBody) -> dict:
    if body.output_config is not None and body.output_config.effort is not None:
        raise bad_request("output_config.effort", "reasoning effort is not supported")
    if body.thinking is None:
        return {}
    return {"enable_thinking": body.thinking.type != "disabled"}


def prompt_of(service: Service, body: CountTokensBody):
    return render_chat(service.tokenizer, template_messages(body), template_tools(body),
                       template_kwargs(body))


# ---- the answer ----------------------------------------------------------------------------------
def stop_reason(finish: str | None, has_calls: bool, stop_sequence: str | None) -> str:
    if finish == "length":
        return "max_tokens"
    if has_calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def tool_use_block(part: Part) -> dict:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": part.call.name,
            "input": json.loads(part.call.arguments)}


def content_blocks(parts: list[Part]) -> list[dict]:
    """The blocks of a whole answer: consecutive parts of one kind are one block."""
    blocks = []
    for part in parts:
        if blocks and part.kind != "call" and part.kind == parts_kind(blocks[-1]):
            blocks[-1]["thinking" if part.kind == "reasoning" else "text"] += part.text
        elif part.kind == "call":
            blocks.append(tool_use_block(part))
        elif part.kind == "reasoning":
            blocks.append({"type": "thinking", "thinking": part.text, "signature": ""})
        else:
            blocks.append({"type": "text", "text": part.text})
    return blocks


def parts_kind(block: dict) -> str:
    return {"thinking": "reasoning", "text": "content"}.get(block["type"], "call")


class BlockEvents:
    """Parts of a streamed answer as Anthropic's content block events."""

    START = {"reasoning": {"type": "thinking", "thinking": "", "signature": ""},
             "content": {"type": "text", "text": ""}}
    DELTA = {"reasoning": ("thinking_delta", "thinking"), "content": ("text_delta", "text")}

    def __init__(self):
        self.index = -1
        self.open: str | None = None   # the kind of the block being written
        self.has_calls = False

    def events(self, parts: list[Part]) -> list[tuple[str, dict]]:
        out = []
        for part in parts:
            if part.kind != self.open or part.kind == "call":
                out += self.close()
                self.index += 1
                block = tool_use_block(part) | {"input": {}} if part.kind == "call" \
                    else self.START[part.kind]
                out.append(("content_block_start", {"index": self.index,
                                                    "content_block": block}))
                self.open = part.kind
            if part.kind == "call":
                self.has_calls = True
                out.append(("content_block_delta", {"index": self.index, "delta": {
                    "type": "input_json_delta", "partial_json": part.call.arguments}}))
                out += self.close()
            else:
                kind, key = self.DELTA[part.kind]
                out.append(("content_block_delta", {"index": self.index,
                                                    "delta": {"type": kind, key: part.text}}))
        return out

    def close(self) -> list[tuple[str, dict]]:
        if self.open is None:
            return []
        out = []
        if self.open == "reasoning":
            out.append(("content_block_delta", {"index": self.index, "delta": {
                "type": "signature_delta", "signature": ""}}))
        out.append(("content_block_stop", {"index": self.index}))
        self.open = None
        return out


def sse_event(name: str, payload: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **payload}, ensure_ascii=False)}\n\n"


async def messages(service: Service, body: MessagesBody, http_request: HTTPRequest):
    for name, why in REFUSED_FIELDS.items():
        if getattr(body, name) is not None:
            raise bad_request(name, why)
    prompt = await off_loop(prompt_of, service, body)
    tools = template_tools(body)
    reader = AnswerReader.for_request(
        service.options.tool_call_parser, service.options.reasoning_parser, tools,
        body.tool_choice is None or body.tool_choice.type != "none", prompt.text)
    grammar = forced_output(service, forced(body), reader)
    stop = stop_strings(body.stop_sequences, "stop_sequences")
    generation = service.submit(prompt.ids, body.max_tokens, body.sampling(service), stop,
                                service.loops_for(body.model, body.loops),
                                http_request=http_request, grammar=grammar)
    message_id = f"msg_{generation.id}"
    model = service.model_id(generation.requests[0].loops)

    def message(content: list, events: list[TokenEvent], has_calls: bool) -> dict:
        finish = generation.finish_reasons[0]
        stop_sequence = matched_stop(service.tokenizer, events, stop)
        return {"id": message_id, "type": "message", "role": "assistant", "model": model,
                "content": content,
                "stop_reason": stop_reason(finish, has_calls, stop_sequence) if finish else None,
                "stop_sequence": stop_sequence,
                "usage": generation.anthropic_input_usage() | output_usage()}

    def output_usage() -> dict:
        """The output tokens and, from a speculating server, its drafts' stats (the OpenAI
        routes' usage extra)."""
        return {"output_tokens": generation.completion_tokens} \
            | generation.speculative_usage()

    if not body.stream:
        def final(choices: list[list[TokenEvent]]) -> dict:
            events = choices[0]
            stream = reader.stream()
            parts = stream.feed("".join(e.text for e in events)) + stream.finish()
            return message(content_blocks(parts), events,
                           any(p.kind == "call" for p in parts))

        return await whole_response(generation, http_request, final, error_response)

    stream, blocks, seen = reader.stream(), BlockEvents(), []

    def encode(events: list[ChoiceEvent]) -> str:
        out = [] if seen else [("message_start", {"message": message([], [], False) | {
            "stop_reason": None, "stop_sequence": None,
            "usage": generation.anthropic_input_usage() | {"output_tokens": 0}}})]
        for _, event in events:
            seen.append(event)
            parts = stream.feed(event.text)
            if event.finish_reason is not None:
                parts += stream.finish()
            out += blocks.events(parts)
        return "".join(sse_event(name, payload) for name, payload in out)

    def end() -> str:
        final = message([], seen, blocks.has_calls)
        return "".join(sse_event(name, payload) for name, payload in [
            *blocks.close(),
            ("message_delta", {"delta": {"stop_reason": final["stop_reason"],
                                         "stop_sequence": final["stop_sequence"]},
                               "usage": output_usage()}),
            ("message_stop", {})])

    return await event_stream(generation, encode, end,
                              lambda error: sse_event("error", error_body(error)),
                              error_response)


def add_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/messages")
    async def messages_route(body: MessagesBody, http_request: HTTPRequest):
        return await messages(service, body, http_request)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens_route(body: CountTokensBody):
        service.loops_for(body.model, None)
        return {"input_tokens": len((await off_loop(prompt_of, service, body)).ids)}

