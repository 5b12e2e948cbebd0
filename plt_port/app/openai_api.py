"""OpenAI's `POST /v1/completions` and `POST /v1/chat/completions`.

Every field OpenAI defines for these endpoints (openai-python's `completion_create_params`
and `chat/completion_create_params`) is honoured or refused with a 400 naming it; a field
OpenAI does not define is a 400 too (`extra="forbid"`), except the sampling extras vLLM and
mlx-lm take (`top_k`, `min_p`, `repetition_penalty`, vLLM's `chat_template_kwargs` and
`ignore_eos`) and this server's `loops`. Fields that only label or route a request (`user`, `metadata`,
`safety_identifier`, `prompt_cache_key`, `service_tier` auto/default, `store` false) are
accepted and change nothing; `REFUSED_CHAT_FIELDS` lists the rest with the reason.

Chat answers go through the tool-call and reasoning parsers (`assistant_output.py`):
`message.tool_calls` with `finish_reason: "tool_calls"`, `reasoning_content` (vLLM's name);
streamed as `delta.tool_calls` fragments (index, id, type and name first, then the
arguments) and `delta.reasoning_content`.

Structured output (grammar-constrained decoding, `assistant_output.forced_output`): chat's
`response_format` json_object / json_schema (strict too), forced `tool_choice` ("required"
or a named function), `parallel_tool_calls: false` and strict function schemas; both
endpoints take `response_format` (vLLM does on completions too) and vLLM's extras
`structured_outputs` (json, regex, choice, json_object) and `guided_json`, `guided_regex`,
`guided_choice`; one of them per request.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError

from runtimes.engine import TokenEvent
from runtimes.generate import encode_prompt
from runtimes.grammar import AnswerFormat, response_format_answer, structured_outputs_answer

from .assistant_output import AnswerReader, ForcedOutput, Part, forced_output, refused_as
from .prompting import joined_text, not_text, render_chat, tool_call_turn
from .service import MAX_MESSAGES, APIError, ChoiceEvent, Generation, SamplingFields, Service, \
    Strict, bad_request, event_stream, items, mapping, off_loop, skippable, sse_data, \
    stop_strings, whole_response

MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def error_body(error: APIError) -> dict:
    return {"error": {"message": error.message, "type": error.type, "param": error.param,
                      "code": error.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status)


# ---- request bodies ------------------------------------------------------------------------------
class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # json_schema's own fields
    type: Literal["text", "json_object", "json_schema"]


class GenerationBody(SamplingFields):
    """Fields both endpoints take (OpenAI's, the sampling extras, the structured-output
    fields, this server's loops)."""

    model: str | None = None
    max_tokens: int | None = None
    n: int | None = None
    stop: str | items(str) | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    loops: int | None = None
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extras
    structured_outputs: mapping(Any) | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: items(str) | None = None
    guided_grammar: Any = None
    ignore_eos: bool | None = None  # vLLM's: eos ends nothing, max_tokens tokens are made

    @property
    def choice_count(self) -> int:
        """n (None: 1; 0 goes on to be refused by name, not taken as 1)."""
        return 1 if self.n is None else self.n


# vLLM's older guided_* fields: the structured_outputs key each one is
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice"}


def prompt_value(value):
    """The completion prompt's shapes (a string, token ids, or a list of either), checked in
    one pass with one error: a union would try each shape and build an error per item."""
    if isinstance(value, str) or is_token_ids(value):
        return value
    if isinstance(value, list) and (all(isinstance(item, str) for item in value)
                                    or all(is_token_ids(item) for item in value)):
        return value
    raise ValueError("must be a string, a list of token ids (integers), or a list of either")


def is_token_ids(value) -> bool:
    return isinstance(value, list) and all(type(item) is int for item in value)


class CompletionBody(GenerationBody):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]],
                      PlainValidator(prompt_value)]
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """An image, audio or file part (refused: this model reads text)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file", "refusal"]


class SystemMessage(Strict):
    role: Literal["system", "developer"]
    content: str | items(TextPart)
    name: str | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: str | items(TextPart | OtherPart)
    name: str | None = None


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCallParam(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: str | items(TextPart | OtherPart) | None = None
    tool_calls: items(ToolCallParam) | None = None
    name: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None  # vLLM's: the reasoning of an earlier turn
    audio: Any = None
    function_call: Any = None


class ToolMessage(Strict):
    role: Literal["tool"]
    content: str | items(TextPart)
    tool_call_id: str


ROLE_MODELS = {"system": SystemMessage, "developer": SystemMessage, "user": UserMessage,
               "assistant": AssistantMessage, "tool": ToolMessage}


class FunctionDefinition(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatBody(GenerationBody):
    messages: items(dict[str, Any], MAX_MESSAGES)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: items(ToolDefinition) | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's
    # accepted, no effect on the answer: labels, routing and caching hints
    metadata: mapping(str) | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    store: Literal[False] | None = None
    modalities: items(Literal["text"]) | None = None
    # refused when given (REFUSED_CHAT_FIELDS)
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None


REFUSED_CHAT_FIELDS = {
    "audio": "audio output is not supported",
    "function_call": "the deprecated function_call is not supported; use tool_choice",
    "functions": "the deprecated functions are not supported; use tools",
    "moderation": "moderation is not supported",
    "prediction": "predicted outputs are not supported",
    "prompt_cache_options": "prompt cache options are not supported",
    "prompt_cache_retention": "prompt cache retention is not supported",
    "reasoning_effort": "reasoning effort is not supported (the model's template decides; "
                        "chat_template_kwargs reaches it)",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
}


# ---- shared checks -------------------------------------------------------------------------------
def check_stream_options(body: GenerationBody) -> bool:
    """Whether the stream ends with a usage chunk."""
    options = body.stream_options
    if options is None:
        return False
    if not body.stream:
        raise bad_request("stream_options", "only allowed with stream: true")
    if options.include_obfuscation:
        raise bad_request("stream_options.include_obfuscation", "stream obfuscation is not "
                                                                "supported")
    return bool(options.include_usage)


def requested_answer(body: GenerationBody) -> tuple[AnswerFormat | None, str]:
    """(the format the text answer must have, the field that asks for it): response_format,
    structured_outputs or one guided_* field, at most one of them."""
    if body.guided_grammar is not None:
        raise bad_request("guided_grammar", "grammars are not supported; use guided_json, "
                                            "guided_regex or guided_choice")
    given = [name for name in ("response_format", "structured_outputs", *GUIDED_FIELDS)
             if getattr(body, name) is not None]
    if len(given) > 1:
        raise bad_request(given[1], f"give one of {', '.join(given)}, not several")
    if not given:
        return None, "response_format"
    param = given[0]
    with refused_as(param):
        if param == "response_format":
            return response_format_answer(body.response_format.model_dump()), param
        spec = body.structured_outputs if param == "structured_outputs" else \
            {GUIDED_FIELDS[param]: getattr(body, param)}
        return structured_outputs_answer(spec), param


def envelope(kind: str, service: Service, generation: Generation, choices: list) -> dict:
    return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{generation.id}",
            "object": kind, "created": int(generation.started),
            "model": service.model_id(generation.requests[0].loops), "choices": choices}


def token_text(tokenizer, token: int) -> str:
    return tokenizer.token_bytes(token).decode("utf-8", errors="replace")


def events_by_choice(events: list[ChoiceEvent]) -> dict[int, list[TokenEvent]]:
    grouped: dict[int, list[TokenEvent]] = {}
    for choice, event in events:
        grouped.setdefault(choice, []).append(event)
    return grouped


def openai_stream(service, generation, usage_chunk: bool, chunks, empty_chunk):
    """Server-sent events: `chunks(events)` per batch, a usage chunk when asked, [DONE]; an
    error after the first chunk is an error event, then [DONE] (as vLLM's)."""
    def end():
        usage = sse_data(empty_chunk() | {"usage": generation.usage()}) if usage_chunk else ""
        return usage + "data: [DONE]\n\n"

    return event_stream(generation, lambda events: "".join(map(sse_data, chunks(events))),
                        end, lambda error: sse_data(error_body(error)) + "data: [DONE]\n\n",
                        error_response)


# ---- /v1/completions -----------------------------------------------------------------------------
def completion_prompt(service: Service, body: CompletionBody) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("prompt", "one prompt per request; send several requests (or "
                                        "n for several answers)")
        prompt = prompt[0]
    if isinstance(prompt, list) and len(prompt) > service.context:
        raise bad_request("prompt", f"{len(prompt)} token ids, more than the model's context "
                                    f"({service.context})")
    return encode_prompt(service.tokenizer, prompt, service.tokenizer.add_bos_token)


def check_completion_fields(body: CompletionBody) -> None:
    if body.suffix is not None:
        raise bad_request("suffix", "fill-in-the-middle (suffix) is not supported")
    if body.best_of is not None and body.best_of != body.choice_count:
        raise bad_request("best_of", "best_of other than n is not supported; use n")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise bad_request("logprobs", f"must be in 0..{MAX_COMPLETION_LOGPROBS}")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo", "echo with logprobs (the prompt's logprobs) is not supported")


async def completions(service: Service, body: CompletionBody, http_request: HTTPRequest):
    check_completion_fields(body)
    usage_chunk = check_stream_options(body)
    tokenizer = service.tokenizer
    prompt_ids = await off_loop(completion_prompt, service, body)
    echo = tokenizer.decode(prompt_ids) if body.echo else ""
    answer, answer_param = requested_answer(body)
    grammar = forced_output(service, ForcedOutput(answer=answer, answer_param=answer_param),
                            AnswerReader())
    generation = service.submit(
        prompt_ids, body.max_tokens if body.max_tokens is not None
        else DEFAULT_COMPLETION_MAX_TOKENS, body.sampling(service),
        stop_strings(body.stop, "stop"),
        service.loops_for(body.model, body.loops), body.choice_count, body.logprobs, http_request,
        grammar=grammar, ignore_eos=bool(body.ignore_eos))

    def logprobs(events: list[TokenEvent], offset: int = 0) -> dict | None:
        if body.logprobs is None:
            return None
        offsets = [offset]
        for event in events[:-1]:
            offsets.append(offsets[-1] + len(event.text))
        return {"tokens": [token_text(tokenizer, e.token) for e in events],
                "token_logprobs": [e.logprobs.logprob for e in events],
                "top_logprobs": [{token_text(tokenizer, t): lp for t, lp in e.logprobs.top}
                                 for e in events],
                "text_offset": offsets}

    sent = [len(echo)] * len(generation.requests)  # characters streamed per choice

    def chunks(events: list[ChoiceEvent]) -> list[dict]:
        out = []
        for choice, event in events:
            if skippable(event) and body.logprobs is None:
                continue
            text = (echo if event.index == 1 else "") + event.text
            out.append(envelope("text_completion", service, generation, [
                {"index": choice, "text": text, "logprobs": logprobs([event], sent[choice]),
                 "finish_reason": event.finish_reason}]))
            sent[choice] += len(event.text)
        return out

    def final(choices: list[list[TokenEvent]]) -> dict:
        return envelope("text_completion", service, generation, [
            {"index": i, "text": echo + "".join(e.text for e in events),
             "logprobs": logprobs(events, len(echo)),
             "finish_reason": generation.finish_reasons[i]}
            for i, events in enumerate(choices)]) | {"usage": generation.usage()}

    if body.stream:
        return await openai_stream(service, generation, usage_chunk, chunks,
                                   lambda: envelope("text_completion", service, generation, []))
    return await whole_response(generation, http_request, final, error_response)


# ---- /v1/chat/completions ------------------------------------------------------------------------
def template_messages(raw: list[dict]) -> list[dict]:
    """OpenAI messages as the chat template reads them (`prompting.py`)."""
    if not raw:
        raise bad_request("messages", "must not be empty")
    return [template_message(message, f"messages.{i}") for i, message in enumerate(raw)]


def template_message(raw: dict, param: str) -> dict:
    model = ROLE_MODELS.get(raw.get("role") if isinstance(raw, dict) else None)
    if model is None:
        raise bad_request(f"{param}.role", f"must be one of {', '.join(ROLE_MODELS)}, got "
                                           f"{raw.get('role') if isinstance(raw, dict) else raw!r}")
    try:
        message = model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join([param, *map(str, first["loc"])])
        raise bad_request(where, first["msg"]) from None
    role = "system" if message.role == "developer" else message.role
    turn = {"role": role, "content": content_text(message.content, f"{param}.content")}
    name = getattr(message, "name", None)
    if name is not None:
        turn["name"] = name
    if isinstance(message, ToolMessage):
        turn["tool_call_id"] = message.tool_call_id
    if isinstance(message, AssistantMessage):
        for field in ("audio", "function_call"):
            if getattr(message, field) is not None:
                raise bad_request(f"{param}.{field}", "not supported; use tool_calls")
        if message.tool_calls:
            turn["tool_calls"] = [tool_call_turn(call.id, call.function.name, call_arguments(
                call.function.arguments, f"{param}.tool_calls.{k}.function.arguments"))
                for k, call in enumerate(message.tool_calls)]
        if message.reasoning_content is not None:
            turn["reasoning_content"] = message.reasoning_content
        if message.refusal is not None and not turn["content"]:
            turn["content"] = message.refusal
    return turn


def content_text(content, param: str) -> str:
    """A turn's content as one string: text parts joined; images and audio refused."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for k, part in enumerate(content):
        if isinstance(part, OtherPart) and part.type != "refusal":
            raise not_text(f"{param}.{k}", part.type)
        texts.append(part.text if isinstance(part, TextPart) else str(part.model_extra.get(
            "refusal", "")))
    return joined_text(texts)


def call_arguments(arguments: str, param: str) -> dict:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        raise bad_request(param, "must be a JSON object (as the model wrote it)") from None
    if not isinstance(value, dict):
        raise bad_request(param, "must be a JSON object")
    return value


def check_chat_fields(body: ChatBody) -> ForcedOutput:
    """Refuse what is not supported; what the request forces on the output."""
    for name, why in REFUSED_CHAT_FIELDS.items():
        if getattr(body, name) is not None:
            raise bad_request(name, why)
    top = body.top_logprobs or 0
    if not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
        raise bad_request("top_logprobs", f"must be in 0..{MAX_CHAT_TOP_LOGPROBS}")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs", "needs logprobs: true")
    answer, answer_param = requested_answer(body)
    choice = body.tool_choice
    return ForcedOutput(
        tools=[tool.model_dump(exclude_none=True) for tool in body.tools or ()],
        tool_choice=choice.model_dump() if isinstance(choice, NamedToolChoice) else choice,
        parallel=body.parallel_tool_calls is not False, answer=answer,
        answer_param=answer_param)


def chat_reader(service: Service, body: ChatBody, tools: list[dict] | None,
                prompt_text: str) -> AnswerReader:
    return AnswerReader.for_request(service.options.tool_call_parser,
                                    service.options.reasoning_parser, tools,
                                    body.tool_choice != "none", prompt_text)


def openai_tool_call(part: Part) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": part.call.name, "arguments": part.call.arguments}}


def part_deltas(part: Part, call_index: int) -> list[dict]:
    """OpenAI's deltas of one part of a streamed answer: a call is two fragments, the first
    with index, id, type and name, the second with the arguments."""
    if part.kind != "call":
        return [{"reasoning_content" if part.kind == "reasoning" else "content": part.text}]
    call = openai_tool_call(part)
    return [{"tool_calls": [{"index": call_index, "id": call["id"], "type": "function",
                             "function": {"name": part.call.name, "arguments": ""}}]},
            {"tool_calls": [{"index": call_index,
                             "function": {"arguments": part.call.arguments}}]}]


def chat_finish_reason(finish: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if finish == "stop" and has_calls else finish


async def chat_completions(service: Service, body: ChatBody, http_request: HTTPRequest):
    forced = check_chat_fields(body)
    usage_chunk = check_stream_options(body)
    tokenizer = service.tokenizer
    tools = forced.tools or None
    prompt = await off_loop(lambda: render_chat(tokenizer, template_messages(body.messages),
                                                tools, body.chat_template_kwargs))
    reader = chat_reader(service, body, tools, prompt.text)
    grammar = forced_output(service, forced, reader)
    limit_param = "max_completion_tokens" if body.max_completion_tokens is not None \
        else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    generation = service.submit(
        prompt.ids, service.chat_max_tokens(requested, len(prompt.ids)),
        body.sampling(service), stop_strings(body.stop, "stop"),
        service.loops_for(body.model, body.loops),
        body.choice_count, (body.top_logprobs or 0) if body.logprobs else None, http_request,
        limit_param, grammar, bool(body.ignore_eos))

    def logprobs(events: list[TokenEvent]) -> dict | None:
        if not body.logprobs:
            return None

        def entry(token: int, logprob: float) -> dict:
            return {"token": token_text(tokenizer, token), "logprob": logprob,
                    "bytes": list(tokenizer.token_bytes(token))}

        return {"content": [entry(e.token, e.logprobs.logprob)
                            | {"top_logprobs": [entry(t, lp) for t, lp in e.logprobs.top]}
                            for e in events]}

    if body.stream:
        streams = [reader.stream() for _ in generation.requests]
        calls_sent = [0] * len(streams)

        def delta_chunks(choice: int, event: TokenEvent) -> list[dict]:
            parts = streams[choice].feed(event.text)
            if event.finish_reason is not None:
                parts += streams[choice].finish()
            deltas = [{"role": "assistant", "content": ""}] if event.index == 1 else []
            for part in parts:
                deltas += part_deltas(part, calls_sent[choice])
                calls_sent[choice] += part.kind == "call"
            if not deltas and (event.finish_reason is not None or body.logprobs):
                deltas = [{}]
            chunks = []
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                finish = chat_finish_reason(event.finish_reason, calls_sent[choice] > 0) \
                    if last else None
                chunks.append(envelope("chat.completion.chunk", service, generation, [
                    {"index": choice, "delta": delta,
                     "logprobs": logprobs([event]) if last else None, "finish_reason": finish}]))
            return chunks

        def chunks(events: list[ChoiceEvent]) -> list[dict]:
            return [chunk for choice, event in events for chunk in delta_chunks(choice, event)]

        return await openai_stream(
            service, generation, usage_chunk, chunks,
            lambda: envelope("chat.completion.chunk", service, generation, []))

    def final(choices: list[list[TokenEvent]]) -> dict:
        out = []
        for i, events in enumerate(choices):
            answer = reader.read("".join(e.text for e in events))
            content = (answer.content or None) if answer.calls else answer.content
            message = {"role": "assistant", "content": content}
            if answer.reasoning:
                message["reasoning_content"] = answer.reasoning
            if answer.calls:
                message["tool_calls"] = [openai_tool_call(Part("call", call=c))
                                         for c in answer.calls]
            out.append({"index": i, "message": message, "logprobs": logprobs(events),
                        "finish_reason": chat_finish_reason(generation.finish_reasons[i],
                                                            bool(answer.calls))})
        return envelope("chat.completion", service, generation, out) | {
            "usage": generation.usage()}

    return await whole_response(generation, http_request, final, error_response)


def add_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/completions")
    async def completions_route(body: CompletionBody, http_request: HTTPRequest):
        return await completions(service, body, http_request)

    @app.post("/v1/chat/completions")
    async def chat_route(body: ChatBody, http_request: HTTPRequest):
        return await chat_completions(service, body, http_request)


