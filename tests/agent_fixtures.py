"""Chat templates and answers for the agent tests, written here in the models' documented
formats: Hermes / Qwen2.5 (tools in `<tools>` of the system turn, JSON calls in
`<tool_call>`), Qwen3-Coder (XML calls `<function=...><parameter=...>`), `<think>` blocks;
and `AgentServer`, a server started in the test's process with the official clients."""

from __future__ import annotations

HERMES_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" + tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.function.name + '", "arguments": ' + tool_call.function.arguments | tojson + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

QWEN3_CODER_TEMPLATE = r"""
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' %}
    {%- set turns = messages %}
{%- endif %}
{{- '<|im_start|>system\n' + system }}
{%- if tools %}
    {{- '\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n<function>\n<name>' + tool.function.name + '</name>\n<description>' + (tool.function.description or '') + '</description>\n<parameters>' + tool.function.parameters | tojson + '</parameters>\n</function>' }}
    {%- endfor %}
    {{- '\n</tools>\n\nTo call a function, reply in this format:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter>\nvalue\n</parameter>\n</function>\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in turns %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' + (message.content or '') }}
        {%- for tool_call in message.tool_calls or [] %}
            {{- '\n<tool_call>\n<function=' + tool_call.function.name + '>\n' }}
            {%- for key, value in tool_call.function.arguments | items %}
                {{- '<parameter=' + key + '>\n' + (value if value is string else value | tojson) + '\n</parameter>\n' }}
            {%- endfor %}
            {{- '</function>\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city, now.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"},
            "units": {"type": "object"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time in a zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}},
]

# Answers as models write them: several calls, nested JSON, unicode, text around the calls,
# a malformed call, a call cut off by max_tokens, tag look-alikes in text and in arguments.
HERMES_ANSWERS = [
    'Let me check both.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich '
    '— 東京", "days": 3, "units": {"temp": ["°C", {"wind": null}], "ok": true}}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET <tool_call> x"}}\n'
    '</tool_call>\n',
    'if a < b and c <tool: pass\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
    '</tool_call>\nDone, ✓ 🎉.',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>\nThat '
    'call is malformed; this one is fine:\n<tool_call>{"name": "get_time", "arguments": '
    '{"zone": "UTC"}}</tool_call>',
    'Cut short: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
    '<think>\nThe user wants the weather. <tool_call> here is only thought.\n</think>\n\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
]
QWEN3_CODER_ANSWERS = [
    'Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\nand 北京\n'
    '</parameter>\n<parameter=days>\n7\n</parameter>\n<parameter=units>\n{"temp": "°F", '
    '"list": [1, 2, {"x": null}]}\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n'
    '<function=get_time>\n<parameter=zone>\nEurope/Berlin\n</parameter>\n</function>\n'
    '</tool_call>',
    '<tool_call>\n<function=get_time>\n<parameter=zone>\nA\n</parameter>\n<parameter=zone>\nB\n'
    '</parameter>\n</function>\n</tool_call> (a parameter twice: malformed) </tool_ca',
    '<think>\nplan: call get_time </think\n</think>\nSure. <tool_call>\n<function=get_time>\n'
    '</function>\n</tool_call>',
]


class AgentServer:
    """`plt-port serve` of `model_dir` on a free 127.0.0.1 port in this process (uvicorn in a
    thread), with an `openai` and an `anthropic` client and an httpx one; `stop()` ends it."""

    def __init__(self, model_dir, backend="torch", name=None, **options):
        import anthropic
        import httpx
        import openai

        from plt_port.app.commands.serve import open_server, start_in_thread
        from plt_port.app.server_options import ServerOptions

        self.engine, self.app = open_server(model_dir, backend, served_model_name=name,
                                            server_options=ServerOptions(**options))
        self.server, self.thread, self.url = start_in_thread(self.app)
        key = options.get("api_key") or "unused"
        self.openai = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0,
                                    timeout=60)
        self.anthropic = anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0,
                                             timeout=60)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.tokenizer = self.engine.tokenizer

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.engine.close()
