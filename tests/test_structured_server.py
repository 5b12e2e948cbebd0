"""Structured output through the server: grammar-constrained decoding wired to OpenAI's
`response_format` and forced `tool_choice`, strict schemas, Anthropic's `tool_choice` and
`output_config.format`, vLLM's extras, with the official clients on servers started by the
tests (the embedded model with a Hermes chat template; no backend is mocked).

The embedded model is random enough to write invalid JSON and no tool calls of its own: what
comes back parses and validates (jsonschema) because the grammar made it so, and the call is
read back by the same tool parser the server reads free answers with.
"""

from __future__ import annotations

import json
import shutil
import threading
from typing import Literal

import pytest

from agent_fixtures import HERMES_TEMPLATE, QWEN3_CODER_TEMPLATE, AgentServer
from conftest import requires

pytestmark = [requires("openai"), requires("anthropic"), requires("fastapi"),
              requires("llguidance"), requires("jsonschema")]

MODEL = "plt-tools"
USER = [{"role": "user", "content": "Weather in Paris, and the time?"}]
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "langs": {"type": "array", "maxItems": 2, "items": {"enum": ["py", "rs", "go"]}}},
    "required": ["name", "age", "langs"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


def validate(instance, schema):
    import jsonschema

    jsonschema.validate(instance, schema)


def model_with_template(tmp_path_factory, template: str) -> str:
    """The embedded model with `template` as its chat template."""
    from plt_port.family import default_model_dir

    model_dir = tmp_path_factory.mktemp("tools") / MODEL
    shutil.copytree(default_model_dir(), model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"chat_template": template}))
    return str(model_dir)


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory) -> str:
    """With a Hermes chat template: tools in the prompt, calls read by the hermes parser."""
    return model_with_template(tmp_path_factory, HERMES_TEMPLATE)


def start(model_dir, backend="torch", **options) -> AgentServer:
    from runtimes.backends import backend_unavailable_reason

    if backend_unavailable_reason(backend):
        pytest.skip(backend_unavailable_reason(backend))
    return AgentServer(model_dir, backend, **options)


@pytest.fixture(scope="module", params=["torch", "onnx", "mlx"])
def any_backend(request, tools_model):
    running = start(tools_model, request.param)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(tools_model):
    running = start(tools_model)
    yield running
    running.stop()


def chat(server, **kwargs):
    return server.openai.chat.completions.create(
        **{"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 64, **kwargs})


def streamed(server, **kwargs) -> tuple[str, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish reason) of a streamed chat, assembled from its
    deltas as a client does."""
    content, calls, finish = "", {}, None
    for chunk in chat(server, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for fragment in choice.delta.tool_calls or ():
                name, arguments = calls.get(fragment.index, ("", ""))
                calls[fragment.index] = (name + (fragment.function.name or ""),
                                         arguments + (fragment.function.arguments or ""))
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def parsed_calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]


def assert_valid_calls(calls, names=SCHEMAS):
    assert calls
    for name, arguments in calls:
        validate(json.loads(arguments), SCHEMAS[name])
        assert name in names


# ---- on every backend ----------------------------------------------------------------------------
def test_required_tool_choice_gives_calls_that_validate(any_backend):
    """tool_choice "required": one or more calls (a random model goes on calling until
    max_tokens: its complete calls come back parsed), the same streamed and not; one call
    exactly with parallel_tool_calls false, finish_reason tool_calls."""
    whole = chat(any_backend, tools=TOOLS, tool_choice="required")
    choice = whole.choices[0]
    assert_valid_calls(parsed_calls(choice.message))
    assert choice.finish_reason in ("tool_calls", "length")
    assert streamed(any_backend, tools=TOOLS, tool_choice="required") == \
        (choice.message.content or "", parsed_calls(choice.message), choice.finish_reason)
    single = chat(any_backend, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert single.choices[0].finish_reason == "tool_calls"
    assert single.choices[0].message.content is None
    assert len(single.choices[0].message.tool_calls) == 1
    assert_valid_calls(parsed_calls(single.choices[0].message))
    assert streamed(any_backend, tools=TOOLS, tool_choice="required",
                    parallel_tool_calls=False) == ("", parsed_calls(single.choices[0].message),
                                                   "tool_calls")


def test_json_schema_response_format_validates(any_backend):
    whole = chat(any_backend, response_format=PERSON_FORMAT)
    assert whole.choices[0].finish_reason == "stop"
    validate(json.loads(whole.choices[0].message.content), PERSON)
    assert streamed(any_backend, response_format=PERSON_FORMAT) == \
        (whole.choices[0].message.content, [], "stop")


# ---- torch ---------------------------------------------------------------------------------------
def test_a_named_function_is_the_one_called(server):
    named = {"type": "function", "function": {"name": "get_time"}}
    choice = chat(server, tools=TOOLS, tool_choice=named).choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = parsed_calls(choice.message)
    assert len(calls) == 1 and calls[0][0] == "get_time"
    assert_valid_calls(calls)
    assert streamed(server, tools=TOOLS, tool_choice=named) == ("", calls, "tool_calls")


def test_qwen3_coder_calls_are_forced_in_its_xml_format(tmp_path_factory):
    """A Qwen3-Coder template: the server's parser is qwen3_coder, and forced calls are
    written in its format, string parameters raw, and read back typed by the schema."""
    running = start(model_with_template(tmp_path_factory, QWEN3_CODER_TEMPLATE))
    try:
        assert running.app.state.service.options.tool_call_parser == "qwen3_coder"
        choice = chat(running, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                      logprobs=True, max_tokens=128).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert "".join(t.token for t in choice.logprobs.content).startswith(
            "<tool_call>\n<function=")
        assert_valid_calls(parsed_calls(choice.message))
        assert streamed(running, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                        max_tokens=128) == ("", parsed_calls(choice.message), "tool_calls")
    finally:
        running.stop()


def test_strict_schemas_close_their_objects(server):
    """A schema that leaves additionalProperties out: greedy, this model adds a property of
    its own and never ends the call; strict: true closes the object (OpenAI's strict mode)."""
    def weather_tool(strict):
        open_schema = {k: v for k, v in WEATHER.items() if k != "additionalProperties"}
        return [{"type": "function", "function": {"name": "get_weather", "strict": strict,
                                                  "parameters": open_schema}}]

    loose = chat(server, tools=weather_tool(False), tool_choice="required",
                 parallel_tool_calls=False).choices[0]
    assert loose.finish_reason == "length" and not loose.message.tool_calls
    strict = chat(server, tools=weather_tool(True), tool_choice="required",
                  parallel_tool_calls=False).choices[0]
    assert strict.finish_reason == "tool_calls"
    assert_valid_calls(parsed_calls(strict.message))
    strict_format = {"type": "json_schema", "json_schema": {
        "name": "person", "strict": True,
        "schema": {k: v for k, v in PERSON.items() if k != "additionalProperties"}}}
    validate(json.loads(chat(server, response_format=strict_format).choices[0].message.content),
             PERSON)


def test_json_object_answers_are_json_objects(server):
    """Sampled (greedy, this model writes digits forever): every answer that ends is one
    JSON object; the others end with finish_reason length, an unfinished prefix."""
    finished = 0
    for seed in range(6):
        choice = chat(server, response_format={"type": "json_object"}, temperature=1.0,
                      seed=seed).choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
            finished += 1
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert finished >= 2
    text, _, finish = streamed(server, response_format={"type": "json_object"},
                               temperature=1.0, seed=0)
    assert text == chat(server, response_format={"type": "json_object"}, temperature=1.0,
                        seed=0).choices[0].message.content


def test_max_tokens_before_the_grammar_completes_is_length(server):
    choice = chat(server, response_format=PERSON_FORMAT, max_tokens=4).choices[0]
    assert choice.finish_reason == "length"
    whole = chat(server, response_format=PERSON_FORMAT).choices[0].message.content
    assert whole.startswith(choice.message.content) and whole != choice.message.content
    cut = chat(server, tools=TOOLS, tool_choice="required", max_tokens=12).choices[0]
    assert cut.finish_reason == "length" and not cut.message.tool_calls
    (name, arguments), = parsed_calls(chat(server, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False).choices[0].message)
    call_text = f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'
    assert call_text.startswith(cut.message.content)  # the unfinished call, as text


def test_free_requests_among_constrained_ones_get_their_solo_text(server):
    """Free and constrained requests decoded in one batch: each free one gets exactly the
    text it gets alone (the grammar masks only its own sequence's logits)."""
    free = [dict(messages=[{"role": "user", "content": f"Say {i}."}], max_tokens=40 + 4 * i,
                 temperature=0.8 if i % 2 else 0, seed=i) for i in range(4)]
    constrained = [dict(response_format=PERSON_FORMAT), dict(tools=TOOLS, tool_choice="required",
                                                             max_tokens=48),
                   dict(response_format={"type": "json_object"}, temperature=1.0, seed=3)]
    alone = [chat(server, **kwargs).choices[0].message.content for kwargs in free]
    constrained_alone = [chat(server, **kwargs).choices[0].message for kwargs in constrained]
    results, widest = {}, [0]
    done = threading.Event()

    def watch():
        while not done.wait(0.002):
            widest[0] = max(widest[0], server.engine.running_count)

    def one(key, kwargs):
        results[key] = chat(server, **kwargs).choices[0].message

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one, args=(("free", i), kwargs))
               for i, kwargs in enumerate(free)]
    threads += [threading.Thread(target=one, args=(("constrained", i), kwargs))
                for i, kwargs in enumerate(constrained)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    done.set()
    watcher.join()
    assert widest[0] >= 2  # they did run together
    assert [results[("free", i)].content for i in range(len(free))] == alone
    assert [results[("constrained", i)].content for i in range(len(constrained))] == \
        [m.content for m in constrained_alone]


def test_uncompilable_schemas_are_400s_naming_them(server):
    import anthropic
    import openai

    cases = [(dict(response_format={"type": "json_schema", "json_schema": {
                 "name": "x", "schema": {"type": "array", "uniqueItems": True}}}),
              "response_format", "uniqueItems"),
             (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
                 "type": "object", "properties": {"a": {"type": "array", "contains": {}}}}}}],
                   tool_choice="required"), "tools.0.function.parameters", "contains"),
             (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "rm"}}),
              "tool_choice", "'rm', which is not among the tools"),
             (dict(tool_choice="required"), "tool_choice", "at least one tool"),
             (dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}),
              "guided_regex", "not several")]
    for kwargs, param, words in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            chat(server, **kwargs)
        assert caught.value.body["param"] == param and words in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai.completions.create(model=MODEL, prompt="x",
                                         extra_body={"structured_outputs": {"regex": "(?=a)"}})
    assert caught.value.body["param"] == "structured_outputs"
    assert "look-around" in caught.value.body["message"]
    with pytest.raises(anthropic.BadRequestError) as caught:
        server.anthropic.messages.create(
            model=MODEL, max_tokens=8, messages=USER, tool_choice={"type": "any"},
            tools=[{"name": "f", "input_schema": {"type": "object", "properties": {
                "a": {"type": "array", "uniqueItems": True}}}}])
    error = caught.value.body
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith("tools.0.input_schema: ")


def test_completions_take_response_format_and_vllm_extras(server):
    def complete(**extra):
        return server.openai.completions.create(model=MODEL, prompt="answer = ", max_tokens=48,
                                                temperature=0, extra_body=extra).choices[0]

    person = complete(response_format=PERSON_FORMAT)
    assert person.finish_reason == "stop"
    validate(json.loads(person.text), PERSON)
    assert complete(guided_json=PERSON).text == person.text
    assert complete(structured_outputs={"json": PERSON}).text == person.text
    assert complete(structured_outputs={"choice": ["yes", "no"]}).text in ("yes", "no")
    assert complete(guided_choice=["yes", "no"]).text in ("yes", "no")
    date = complete(structured_outputs={"regex": r"20\d\d-(0[1-9]|1[0-2])-[0-2]\d"}).text
    assert len(date) == 10 and date[:2] == "20" and complete(guided_regex=r"20\d\d-(0[1-9]|1"
                                                                          r"[0-2])-[0-2]\d").text \
        == date


# ---- Anthropic -----------------------------------------------------------------------------------
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]


def test_anthropic_tool_choice_any_tool_and_one_call(server):
    kwargs = dict(model=MODEL, max_tokens=64, messages=USER, tools=ANTHROPIC_TOOLS,
                  extra_body={"temperature": 0})
    reply = server.anthropic.messages.create(tool_choice={"type": "any"}, **kwargs)
    uses = [b for b in reply.content if b.type == "tool_use"]
    assert uses and all(b.id.startswith("toolu_") for b in uses)
    for block in uses:
        validate(block.input, SCHEMAS[block.name])
    with server.anthropic.messages.stream(tool_choice={"type": "any"}, **kwargs) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == \
        [(b.name, b.input) for b in uses] and final.stop_reason == reply.stop_reason
    one = server.anthropic.messages.create(
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        **kwargs)
    assert one.stop_reason == "tool_use" and [b.type for b in one.content] == ["tool_use"]
    assert one.content[0].name == "get_weather"
    validate(one.content[0].input, WEATHER)


def test_anthropic_output_format(server):
    reply = server.anthropic.messages.create(
        model=MODEL, max_tokens=64, messages=USER, extra_body={"temperature": 0},
        output_config={"format": {"type": "json_schema", "schema": PERSON}})
    assert reply.stop_reason == "end_turn" and [b.type for b in reply.content] == ["text"]
    validate(json.loads(reply.content[0].text), PERSON)


# ---- the OpenAI Agents SDK -----------------------------------------------------------------------
@requires("agents")
def test_openai_agents_sdk_calls_a_function_tool_and_gets_its_result(server):
    """An agent turn through the Agents SDK (Chat Completions model, tracing off, nothing
    leaves this machine): tool_choice required makes the model call the Python function
    tool, whose strict schema (the SDK's default) the server enforces; the SDK runs it and
    sends the result back, and the model's next turn (tool_choice reset to auto) answers."""
    import asyncio

    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool,
                        set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    ran, prompts = [], []

    @function_tool
    def get_time(zone: Literal["UTC", "CET", "JST"]) -> str:
        """The time in a zone."""
        ran.append(zone)
        return f"14:05 in {zone}"

    assert get_time.strict_json_schema
    service = server.app.state.service
    submit = service.submit

    def recording_submit(prompt_ids, *args, **kwargs):
        prompts.append(service.tokenizer.decode(prompt_ids))
        return submit(prompt_ids, *args, **kwargs)

    model = OpenAIChatCompletionsModel(model=MODEL, openai_client=AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", max_retries=0))
    agent = Agent(name="clock", instructions="Tell the time.", tools=[get_time], model=model,
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                               temperature=0, max_tokens=48))
    service.submit = recording_submit
    try:
        result = asyncio.run(Runner.run(agent, "What time is it in Paris?", max_turns=2))
    finally:
        service.submit = submit
    assert len(ran) == 1 and len(prompts) == 2
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    call = result.new_items[0].raw_item
    assert call.name == "get_time" and json.loads(call.arguments) == {"zone": ran[0]}
    assert f"<tool_response>\n14:05 in {ran[0]}\n</tool_response>" in prompts[1]
    assert isinstance(result.final_output, str)
