"""Agent-ready serving through the official `openai` and `anthropic` clients, on servers
started by the tests: tools rendered into the prompt as Hugging Face renders them, tool-call
history, tool calls parsed out of what the real model and engine generate, reasoning, n > 1
from one prefill, OpenAI's penalties and logit_bias, refused fields, the Messages API and its
event stream, the API key, CORS, the access log.

The agent model is a tiny random PLT model with a Hermes chat template whose tokenizer has
added tokens for pieces of a real answer (`<tool_call>`, the calls' JSON, a think block).
Their lm_head rows are zero, so their logits are exactly 0 whatever the context: logit_bias
decides them, and OpenAI's presence/frequency penalties (4 per use at 2 + 2) order them, so
greedy decoding writes a known answer token by token through the real model, engine,
sampler and parsers (no trained tool-calling model runs here). Forced output (a required
tool, strict schemas, one call at most) is grammar-constrained decoding over the same model:
where it forbids a piece of the known answer, the answer changes, and what comes back still
parses and validates.
"""

from __future__ import annotations

import json
import logging
import time

import pytest

from agent_fixtures import HERMES_TEMPLATE, WEATHER_TOOLS, AgentServer
from conftest import LOUD_STD, requires, tiny_config

pytestmark = [requires("openai"), requires("anthropic"), requires("fastapi"),
              requires("transformers")]

IM_START, IM_END, CALL_START, CALL_END, CALLS, THOUGHT, PLAN = range(512, 519)
CALLS_TEXT = ('\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
              '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n')
THOUGHT_TEXT = "<think>\nThe user asks for the weather.\n</think>\n\nChecking both.\n<tool_call>"
PLAN_TEXT = "<think>\nI will call a tool.\n</think>\n\n"
ADDED = {IM_START: "<|im_start|>", IM_END: "<|im_end|>", CALL_START: "<tool_call>",
         CALL_END: "</tool_call>", CALLS: CALLS_TEXT, THOUGHT: THOUGHT_TEXT, PLAN: PLAN_TEXT}
PENALTIES = dict(frequency_penalty=2.0, presence_penalty=2.0)  # 4 per use of a token
# greedy with PENALTIES: the thought (ending with the start tag), the calls, the end tag, eos
BIASED_CALLS = {str(THOUGHT): 100, str(CALLS): 99, str(CALL_END): 98, str(IM_END): 97}
EXPECTED_CALLS = [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "CET"})]
USER = [{"role": "system", "content": "You help with travel."},
        {"role": "user", "content": "Weather and time in Paris?"}]


@pytest.fixture(scope="module")
def agent_model(tmp_path_factory, tokenizer_dir) -> str:
    from plt_port.checkpoint import save_model_dir
    from plt_port.random_model import random_tensors

    config = tiny_config(vocab_size=520, max_position_embeddings=2048)
    tensors = random_tensors(config, seed=0, std=LOUD_STD)
    tensors["lm_head.weight"][list(ADDED)] = 0  # logits exactly 0
    model_dir = tmp_path_factory.mktemp("agent") / "plt-agent"
    save_model_dir(model_dir, config, tensors, tokenizer_dir)
    config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config |= {"chat_template": HERMES_TEMPLATE, "eos_token": "<|im_end|>",
                         "added_tokens_decoder": {str(i): {"content": c, "special": True}
                                                  for i, c in ADDED.items()}}
    config_path.write_text(json.dumps(tokenizer_config))
    return str(model_dir)


@pytest.fixture(scope="module")
def agent(agent_model):
    running = AgentServer(agent_model, reasoning_parser="qwen3")
    yield running
    running.stop()


def independent_prompt_ids(tokenizer, messages, tools=None) -> list[int]:
    """The prompt as Hugging Face's own renderer writes it, encoded by the model's tokenizer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], tools=tools,
                                        chat_template=tokenizer.chat_template,
                                        add_generation_prompt=True,
                                        **tokenizer.special_token_strings())
    return [tokenizer.bos_id] + tokenizer.encode(rendered[0])


def greedy_continuation(agent, prompt_ids, max_tokens=6) -> str:
    return agent.openai.completions.create(model="plt-agent", prompt=prompt_ids,
                                           max_tokens=max_tokens, temperature=0).choices[0].text


def assert_calls(tool_calls, expected=EXPECTED_CALLS):
    assert [(c.function.name, json.loads(c.function.arguments)) for c in tool_calls] == expected
    assert all(c.id.startswith("call_") and c.type == "function" for c in tool_calls)
    assert len({c.id for c in tool_calls}) == len(tool_calls)


# ---- the prompt ----------------------------------------------------------------------------------
def test_tools_and_tool_history_are_rendered_as_hugging_face_renders_them(agent):
    """The server's prompt (its greedy answer and token count) equals the one Hugging Face's
    renderer makes of the same conversation: tools in the system turn, then an assistant
    turn with content null and tool_calls (arguments as objects) and the tool results."""
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 °C, sun"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]}]
    as_template = history[:2] + [
        history[2] | {"content": "", "tool_calls": [
            c | {"function": c["function"] | {"arguments": json.loads(c["function"]["arguments"])}}
            for c in history[2]["tool_calls"]]},
        history[3] | {"name": "get_weather"}, history[4] | {"content": "14:05", "name": "get_time"}]
    for messages, template_messages in ((USER, USER), (history, as_template)):
        ids = independent_prompt_ids(agent.tokenizer, template_messages, WEATHER_TOOLS)
        assert "get_weather" in agent.tokenizer.decode(ids)
        chat = agent.openai.chat.completions.create(model="plt-agent", messages=messages,
                                                    tools=WEATHER_TOOLS, max_tokens=6,
                                                    temperature=0)
        assert chat.usage.prompt_tokens == len(ids)
        assert chat.choices[0].message.content == greedy_continuation(agent, ids)


def test_a_template_without_tools_and_images_get_400s(agent):
    import openai

    from plt_port.app.prompting import render_chat
    from plt_port.app.service import APIError
    from plt_port.family import default_model_dir
    from plt_port.tokenizer import Tokenizer

    plain = Tokenizer.from_dir(default_model_dir())
    with pytest.raises(APIError, match="no tool support"):
        render_chat(plain, USER, WEATHER_TOOLS)
    image = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(openai.BadRequestError, match="images are not supported") as caught:
        agent.openai.chat.completions.create(model="plt-agent", messages=image)
    assert caught.value.body["param"] == "messages.0.content.1"


# ---- tool calls and reasoning out of the real model ----------------------------------------------
def biased(agent, **kwargs):
    """The known answer (BIASED_CALLS), with the request's fields."""
    return agent.openai.chat.completions.create(
        **{"model": "plt-agent", "messages": USER, "tools": WEATHER_TOOLS, "temperature": 0,
           "logit_bias": BIASED_CALLS, **PENALTIES, **kwargs})


def test_tool_calls_and_reasoning_come_out_parsed(agent):
    chat = biased(agent, max_tokens=10)
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls" and chat.usage.completion_tokens == 4
    assert choice.message.content == "Checking both."
    assert choice.message.model_extra["reasoning_content"] == "The user asks for the weather."
    assert_calls(choice.message.tool_calls)


def test_streamed_tool_calls_are_openai_fragments_and_equal_the_whole_answer(agent):
    chunks = list(biased(agent, max_tokens=10, stream=True))
    reasoning = content = ""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
            assert "<tool" not in (delta.content or "") and "<think" not in (delta.content or "")
            for fragment in delta.tool_calls or ():
                if fragment.index not in calls:  # the first fragment: id, type and name
                    assert fragment.id and fragment.type == "function" and fragment.function.name
                    calls[fragment.index] = {"id": fragment.id, "name": fragment.function.name,
                                             "arguments": fragment.function.arguments or ""}
                else:
                    assert fragment.id is None and fragment.function.name is None
                    calls[fragment.index]["arguments"] += fragment.function.arguments
            finish = choice.finish_reason or finish
    assert (reasoning, content, finish) == ("The user asks for the weather.", "Checking both.",
                                            "tool_calls")
    assert sorted(calls) == [0, 1]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == EXPECTED_CALLS


def test_tool_choice_none_leaves_the_calls_in_the_text(agent):
    choice = biased(agent, max_tokens=10, tool_choice="none").choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content == "Checking both.\n<tool_call>" + CALLS_TEXT + "</tool_call>"


def test_a_call_cut_by_max_tokens_comes_back_as_text(agent):
    """Two tokens: the first call is whole, the second cut off: it stays in the content."""
    choice = biased(agent, max_tokens=2).choices[0]
    assert choice.finish_reason == "length"
    assert_calls(choice.message.tool_calls, EXPECTED_CALLS[:1])
    assert choice.message.content == "Checking both." + CALLS_TEXT[CALLS_TEXT.index("<tool_call>"):]


def test_tool_call_round_trip(agent):
    """A call the server forced (tool_choice required, after a reasoning block biased in)
    goes back as history, with its result: a valid request, rendered as Hugging Face
    renders it."""
    first = agent.openai.chat.completions.create(
        model="plt-agent", messages=USER, tools=WEATHER_TOOLS, temperature=0, max_tokens=120,
        tool_choice="required", parallel_tool_calls=False, logit_bias={str(PLAN): 100})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert choice.message.model_extra["reasoning_content"] == "I will call a tool."
    message = choice.message
    results = [{"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in message.tool_calls]
    history = USER + [message.model_dump(exclude_none=True)] + results
    again = agent.openai.chat.completions.create(model="plt-agent", messages=history,
                                                 tools=WEATHER_TOOLS, max_tokens=3,
                                                 temperature=0)
    assert again.choices[0].finish_reason in ("length", "stop")
    assert again.usage.prompt_tokens == len(independent_prompt_ids(
        agent.tokenizer, USER + [{"role": "assistant", "content": "",
                                  "reasoning_content": "I will call a tool.",
                                  "tool_calls": [{"id": c.id, "type": "function", "function": {
                                      "name": c.function.name,
                                      "arguments": json.loads(c.function.arguments)}}
                                      for c in message.tool_calls]}]
        + [r | {"name": c.function.name} for r, c in zip(results, message.tool_calls)],
        WEATHER_TOOLS))


def test_strict_tools_and_one_call_are_enforced_under_auto(agent):
    """tool_choice auto: the known answer's calls break a strict get_weather without `days`,
    and parallel_tool_calls false forbids its second call: the answer changes, its text is
    free (the same reasoning, content that starts the same), and each call validates."""
    import jsonschema

    strict_weather = {"type": "function", "function": {
        "name": "get_weather", "strict": True, "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"]}}}
    schemas = {"get_weather": strict_weather["function"]["parameters"] |
               {"additionalProperties": False}, "get_time": WEATHER_TOOLS[1]["function"][
                   "parameters"]}
    for kwargs in (dict(tools=[strict_weather, WEATHER_TOOLS[1]]),
                   dict(parallel_tool_calls=False)):
        choice = biased(agent, max_tokens=40, **kwargs).choices[0]
        message = choice.message
        assert message.model_extra["reasoning_content"] == "The user asks for the weather."
        assert message.content.startswith("Checking both.")
        calls = [(c.function.name, json.loads(c.function.arguments))
                 for c in message.tool_calls or ()]
        assert calls != EXPECTED_CALLS and len(calls) <= 1 + ("tools" in kwargs)
        for name, arguments in calls:
            jsonschema.validate(arguments, schemas[name])


# ---- sampling ------------------------------------------------------------------------------------
def completion_tokens(agent, **kwargs) -> list[int]:
    completion = agent.openai.completions.create(
        model="plt-agent", prompt="<tool_call><tool_call> x", max_tokens=4, temperature=0,
        logprobs=0, **kwargs)
    tokens = completion.choices[0].logprobs.tokens
    return [{v: k for k, v in ADDED.items()}[t] for t in tokens]


def test_presence_frequency_penalties_and_logit_bias_follow_openai(agent):
    """Two tokens whose logits are 0, biased 100 and 99: greedy picks the first always;
    presence 2 once it was generated (100 - 2 < 99), then the first again (98 > 99 - 2);
    frequency 2 every time it was (100 - 2k): the two alternate. Prompt tokens never count."""
    bias = {str(CALL_START): 100, str(CALL_END): 99}
    assert completion_tokens(agent, logit_bias=bias) == [CALL_START] * 4
    assert completion_tokens(agent, logit_bias=bias, presence_penalty=2) == \
        [CALL_START, CALL_END, CALL_START, CALL_START]
    assert completion_tokens(agent, logit_bias=bias, frequency_penalty=2) == \
        [CALL_START, CALL_END, CALL_START, CALL_END]
    chat = agent.openai.chat.completions.create(model="plt-agent", messages=USER, max_tokens=4,
                                                temperature=0, logit_bias=bias,
                                                frequency_penalty=2)
    assert chat.choices[0].message.content == "<tool_call></tool_call>" * 2


def test_n_samples_share_one_prefill_and_match_their_seeds(agent):
    backend = agent.engine.backend
    prefills = []
    original = backend.prefill
    backend.prefill = lambda *args, **kwargs: prefills.append(1) or original(*args, **kwargs)
    try:
        kwargs = dict(model="plt-agent", messages=USER, max_tokens=8, temperature=1.0)
        both = agent.openai.chat.completions.create(n=2, seed=5, **kwargs)
        assert len(prefills) == 1 and [c.index for c in both.choices] == [0, 1]
        alone = [agent.openai.chat.completions.create(seed=seed, **kwargs).choices[0]
                 for seed in (5, 6)]
    finally:
        backend.prefill = original
    assert [c.message.content for c in both.choices] == [c.message.content for c in alone]
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in [both]) \
        and both.usage.completion_tokens == 16
    streamed = {0: "", 1: ""}
    for chunk in agent.openai.chat.completions.create(n=2, seed=5, stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert list(streamed.values()) == [c.message.content for c in both.choices]


# ---- what is refused -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,param,words", [
    (dict(extra_body={"bogus": 1}), "bogus", "unknown field"),
    (dict(extra_body={"guided_grammar": "start: x"}), "guided_grammar", "not supported"),
    (dict(extra_body={"structured_outputs": {"grammar": "start: x"}}), "structured_outputs",
     "grammar not supported"),
    (dict(reasoning_effort="high"), "reasoning_effort", "not supported"),
    (dict(stream_options={"include_usage": True}), "stream_options", "stream"),
])
def test_fields_that_are_not_honoured_are_refused_by_name(agent, kwargs, param, words):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        agent.openai.chat.completions.create(model="plt-agent", messages=USER, **kwargs)
    assert caught.value.body["param"] == param and words in caught.value.body["message"]


def test_completion_fields_suffix_best_of_echo(agent):
    import openai

    for kwargs, param in ((dict(suffix="x"), "suffix"), (dict(best_of=3), "best_of"),
                          (dict(extra_body={"bogus": 1}), "bogus")):
        with pytest.raises(openai.BadRequestError) as caught:
            agent.openai.completions.create(model="plt-agent", prompt="x", **kwargs)
        assert caught.value.body["param"] == param
    echoed = agent.openai.completions.create(model="plt-agent", prompt="def f", max_tokens=3,
                                             echo=True, temperature=0, n=2)
    plain = agent.openai.completions.create(model="plt-agent", prompt="def f", max_tokens=3,
                                            temperature=0)
    assert [c.text for c in echoed.choices] == ["def f" + plain.choices[0].text] * 2


def keys(typed_dict) -> set[str]:
    return set(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


def test_every_field_of_the_official_sdks_is_declared():
    """Each field the SDKs' request types name is a field of the request models, where the
    server honours or refuses it (an undeclared one would be an "unknown field" 400)."""
    import anthropic.types as claude
    import openai.types.chat as chat
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params
    from anthropic.types import message_count_tokens_params, message_create_params
    from openai.types.shared_params import FunctionDefinition

    from plt_port.app import anthropic_api, openai_api

    def fields(model) -> set[str]:
        return set(model.model_fields)

    pairs = [(completion_create_params.CompletionCreateParamsStreaming, openai_api.CompletionBody),
             (chat_params.CompletionCreateParamsStreaming, openai_api.ChatBody),
             (chat.ChatCompletionAssistantMessageParam, openai_api.AssistantMessage),
             (chat.ChatCompletionUserMessageParam, openai_api.UserMessage),
             (chat.ChatCompletionSystemMessageParam, openai_api.SystemMessage),
             (chat.ChatCompletionDeveloperMessageParam, openai_api.SystemMessage),
             (chat.ChatCompletionToolMessageParam, openai_api.ToolMessage),
             (chat.ChatCompletionFunctionToolParam, openai_api.ToolDefinition),
             (chat.ChatCompletionMessageFunctionToolCallParam, openai_api.ToolCallParam),
             (FunctionDefinition, openai_api.FunctionDefinition),
             (message_create_params.MessageCreateParamsStreaming, anthropic_api.MessagesBody),
             (message_count_tokens_params.MessageCountTokensParams, anthropic_api.CountTokensBody),
             (claude.ToolParam, anthropic_api.Tool),
             (claude.TextBlockParam, anthropic_api.TextBlock),
             (claude.ToolUseBlockParam, anthropic_api.ToolUseBlock),
             (claude.ToolResultBlockParam, anthropic_api.ToolResultBlock),
             (claude.ThinkingBlockParam, anthropic_api.ThinkingBlock)]
    for sdk_type, model in pairs:
        assert keys(sdk_type) <= fields(model), (model.__name__, keys(sdk_type) - fields(model))


def test_models_retrieve_has_the_context(agent):
    import openai

    model = agent.openai.models.retrieve("plt-agent@loops=3")
    assert model.id == "plt-agent@loops=3" and model.model_extra["max_model_len"] == 2048
    with pytest.raises(openai.NotFoundError):
        agent.openai.models.retrieve("nope")


# ---- Anthropic's Messages API --------------------------------------------------------------------
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in WEATHER_TOOLS]
# temperature: in the Messages API before (this anthropic SDK no longer names it)
BIASED_EXTRA = dict(extra_body={"logit_bias": BIASED_CALLS, **PENALTIES, "temperature": 0})


def test_anthropic_text_and_count_tokens(agent):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Weather and time?"}]}]
    reply = agent.anthropic.messages.create(model="plt-agent", max_tokens=5, system="Be brief.",
                                            messages=messages, extra_body={"temperature": 0})
    assert reply.role == "assistant" and reply.stop_reason in ("max_tokens", "end_turn")
    assert [b.type for b in reply.content] == ["text"]
    counted = agent.anthropic.messages.count_tokens(model="plt-agent", system="Be brief.",
                                                    messages=messages)
    assert reply.usage.input_tokens == counted.input_tokens
    openai_reply = agent.openai.chat.completions.create(
        model="plt-agent", max_tokens=5, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user",
                                                                "content": "Weather and time?"}])
    assert reply.content[0].text == openai_reply.choices[0].message.content
    assert reply.usage.input_tokens == openai_reply.usage.prompt_tokens


def test_anthropic_tools_give_tool_use_blocks_and_take_tool_results(agent):
    kwargs = dict(model="plt-agent", max_tokens=10, system="You help with travel.",
                  tools=ANTHROPIC_TOOLS, messages=[{"role": "user",
                                                    "content": "Weather and time in Paris?"}])
    reply = agent.anthropic.messages.create(**kwargs, **BIASED_EXTRA)
    assert reply.stop_reason == "tool_use" and reply.stop_sequence is None
    assert [b.type for b in reply.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert reply.content[0].thinking == "The user asks for the weather."
    assert reply.content[1].text == "Checking both."
    assert [(b.name, b.input) for b in reply.content[2:]] == EXPECTED_CALLS
    counted = agent.anthropic.messages.count_tokens(model="plt-agent", system=kwargs["system"],
                                                    tools=ANTHROPIC_TOOLS,
                                                    messages=kwargs["messages"])
    openai_ids = independent_prompt_ids(agent.tokenizer, USER, WEATHER_TOOLS)
    assert reply.usage.input_tokens == counted.input_tokens == len(openai_ids)
    results = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": b.id, "content": "ok"} for b in reply.content[2:]]}
    again = agent.anthropic.messages.create(**kwargs | {"messages": kwargs["messages"] + [
        {"role": "assistant", "content": reply.content}, results], "max_tokens": 2,
        "extra_body": {"temperature": 0}})
    assert again.stop_reason in ("max_tokens", "end_turn") and again.usage.input_tokens > \
        reply.usage.input_tokens


def test_anthropic_stream_events_come_in_order_and_add_up_to_the_message(agent):
    kwargs = dict(model="plt-agent", max_tokens=10, tools=ANTHROPIC_TOOLS,
                  messages=[{"role": "user", "content": "Weather and time in Paris?"}],
                  **BIASED_EXTRA)
    whole = agent.anthropic.messages.create(**kwargs)
    events = list(agent.anthropic.messages.create(stream=True, **kwargs))
    names = [e.type for e in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    blocks, open_index = [], None
    for event in events[1:-2]:
        if event.type == "content_block_start":
            assert open_index is None and event.index == len(blocks)
            open_index = event.index
            blocks.append({"type": event.content_block.type, "text": "", "json": "",
                           "name": getattr(event.content_block, "name", None)})
        elif event.type == "content_block_delta":
            assert event.index == open_index
            delta = event.delta
            blocks[-1]["text"] += getattr(delta, "text", "") or getattr(delta, "thinking", "")
            blocks[-1]["json"] += getattr(delta, "partial_json", "")
        else:
            assert event.type == "content_block_stop" and event.index == open_index
            open_index = None
    assert open_index is None and events[-2].delta.stop_reason == "tool_use"
    assert events[-2].usage.output_tokens == whole.usage.output_tokens
    assert [b["type"] for b in blocks] == [b.type for b in whole.content]
    assert blocks[0]["text"] == whole.content[0].thinking
    assert blocks[1]["text"] == whole.content[1].text
    assert [(b["name"], json.loads(b["json"])) for b in blocks[2:]] == EXPECTED_CALLS
    with agent.anthropic.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == EXPECTED_CALLS


def test_anthropic_stop_sequences_and_errors(agent):
    import anthropic

    reply = agent.anthropic.messages.create(
        model="plt-agent", max_tokens=6, messages=[{"role": "user", "content": "x"}],
        stop_sequences=["</tool_call>"],
        extra_body={"logit_bias": {str(CALL_START): 100, str(CALL_END): 99},
                    "frequency_penalty": 2, "temperature": 0})
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", "</tool_call>")
    assert reply.content[0].text == "<tool_call>"
    for kwargs, words in ((dict(extra_body={"bogus": 1}), "unknown field"),
                          (dict(tool_choice={"type": "tool"}, tools=ANTHROPIC_TOOLS),
                           "names the tool"),
                          (dict(output_config={"format": {"type": "xml"}}), "json_schema"),
                          (dict(messages=[{"role": "user", "content": [
                              {"type": "image", "source": {"type": "base64", "data": "AA",
                                                           "media_type": "image/png"}}]}]),
                           "images are not supported")):
        with pytest.raises(anthropic.BadRequestError) as caught:
            agent.anthropic.messages.create(**{"model": "plt-agent", "max_tokens": 4,
                                               "messages": [{"role": "user", "content": "x"}],
                                               **kwargs})
        body = caught.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert words in body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        agent.anthropic.messages.create(model="claude-nope", max_tokens=4,
                                        messages=[{"role": "user", "content": "x"}])


# ---- server hygiene ------------------------------------------------------------------------------
def test_api_key_cors_and_served_model_name(agent_model):
    import anthropic
    import openai

    keyed = AgentServer(agent_model, name="my-agent", api_key="sekrit",
                        allowed_origins=("http://localhost:3000",), default_max_tokens=5)
    try:
        for path, method in (("/v1/models", "GET"), ("/v1/models/my-agent", "GET"),
                             ("/metrics", "GET"), ("/v1/completions", "POST"),
                             ("/v1/chat/completions", "POST"), ("/v1/messages", "POST"),
                             ("/v1/messages/count_tokens", "POST")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
                response = keyed.http.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (path, headers)
                error = response.json()
                assert (error["error"]["type"] == "authentication_error") if \
                    path.startswith("/v1/messages") else error["error"]["code"] == \
                    "invalid_api_key"
        assert keyed.http.get("/health").status_code == 200
        assert keyed.http.get("/v1/models", headers={"x-api-key": "sekrit"}).status_code == 401
        assert keyed.openai.models.list().data[0].id == "my-agent"  # Bearer
        assert keyed.anthropic.messages.count_tokens(  # x-api-key
            model="my-agent", messages=[{"role": "user", "content": "x"}]).input_tokens
        unbounded = keyed.openai.chat.completions.create(model="my-agent", messages=USER,
                                                         temperature=0)
        assert unbounded.usage.completion_tokens == 5  # the server's --max-tokens
        assert unbounded.model == "my-agent"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope").models.list()
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=keyed.url, api_key="nope", max_retries=0).messages.create(
                model="my-agent", max_tokens=2, messages=[{"role": "user", "content": "x"}])
        preflight = keyed.http.options("/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    finally:
        keyed.stop()


def access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "plt_port.app.access"
            and "OPTIONS" not in r.getMessage()]


def test_no_cors_by_default_and_one_access_log_line_per_request(agent, caplog):
    preflight = agent.http.options("/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    with caplog.at_level(logging.INFO, logger="plt_port.app.access"):
        caplog.clear()
        agent.openai.chat.completions.create(model="plt-agent", messages=USER, max_tokens=3,
                                             temperature=0)
        agent.http.get("/v1/models/nope")
        deadline = time.monotonic() + 10  # a line is written once the response is sent
        while len(access_lines(caplog)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    lines = sorted(access_lines(caplog), key=lambda line: "GET" in line)  # written in any order
    assert len(lines) == 2
    prompt = len(independent_prompt_ids(agent.tokenizer, USER))
    assert '"POST /v1/chat/completions" 200 prompt=' + str(prompt) + " completion=3" in lines[0]
    assert '"GET /v1/models/nope" 404 prompt=- completion=-' in lines[1]
