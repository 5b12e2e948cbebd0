"""Chat templates rendered as Hugging Face renders them, in a sandbox whose work is bounded.

A template comes with a model directory: it must not reach Python objects (Jinja2's immutable
sandbox), and a render must end soon, in bounded memory, whatever it does. Two budgets, both
counts, not seconds (a render passes or fails the same on every machine):
- steps: every attribute or item lookup, call, loop item, `range` item and output piece;
- size: the characters (or items) of every value an operator, filter, call, slice, `~`
  concatenation or output builds. What can build far more than its inputs (`*`, `+`, `%`,
  `center`, `indent`, `replace`, `join`, `format`, `lipsum`, `tojson`, ...) is estimated and
  refused before it runs. The size budget grows with the input (messages, tools, variables), so
  a long legitimate chat fits.
`~`, output and `for` loops are counted by rewriting the template's syntax tree (Jinja2's
public node classes) into calls of the sandbox's counters. A macro that recurses without end
stops at Python's recursion limit, as a template error.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Iterator

MAX_TEMPLATE_STEPS = 100_000    # lookups, calls, loop items and output pieces of one render
MAX_TEMPLATE_SIZE = 1 << 24     # characters or items one render builds, besides its input's
INPUT_SIZE_FACTOR = 8           # ... plus this many times the size of its input
MAX_TEMPLATE_REPEAT = 1 << 20   # longest string or list `*` may build, in items
MAX_POWER = 64                  # largest exponent of `**`
MAX_JSON_INDENT = 64


class TemplateLimitError(Exception):
    """A render past a budget, or a template that is not a chat template."""


def named_templates(value, where: str) -> dict[str, str]:
    """tokenizer_config.json's `chat_template`: one template, or Hugging Face's list of named
    ones (`[{"name": "default", "template": ...}, {"name": "tool_use", ...}]`)."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
            isinstance(entry, dict) and isinstance(entry.get("name"), str)
            and isinstance(entry.get("template"), str) for entry in value):
        templates = {entry["name"]: entry["template"] for entry in value}
        if len(templates) < len(value):
            raise TemplateLimitError(f"{where}: chat_template names a template twice")
        return templates
    raise TemplateLimitError(f"{where}: chat_template must be a string or a list of "
                             f"{{\"name\": ..., \"template\": ...}} objects, got "
                             f"{type(value).__name__}")


def template_for(templates: dict[str, str], tools) -> str | None:
    """The template Hugging Face picks: "tool_use" when tools are passed and it exists, else
    "default" (None: no template)."""
    if tools and "tool_use" in templates:
        return templates["tool_use"]
    return templates.get("default")


def input_size(value) -> int:
    """Characters of the strings in `value` plus one per other item (JSON-like data)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
            continue
        total += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def text_size(value, limit: int) -> int:
    """A bound on the length of `str(value)` (containers: their strings plus a few characters
    per item), stopping early once past `limit`."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, dict):
            total += 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 * len(item) + 2
            stack.extend(item)
        else:
            total += 32
    return total


def built_size(value) -> int:
    """What counts against the size budget for a value an operation returned."""
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _arg(args, kwargs, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str_len(value) -> int:
    return len(value) if isinstance(value, str) else 0


def _count(text, part) -> int:
    if not isinstance(text, str) or not isinstance(part, str):
        return 0
    return len(text) + 1 if part == "" else text.count(part)


def format_size(fmt, args, kwargs, limit: int) -> int:
    """A bound on what `fmt % args`, `fmt|format(...)` or `fmt.format(...)` builds: the numbers
    written in the format string (widths, precisions), the int arguments when the format takes
    widths from them (`*` or nested braces), and the arguments' text."""
    if not isinstance(fmt, str):
        return 0
    widths = sum(10 * limit if len(digits) > 9 else int(digits)
                 for digits in re.findall(r"\d+", fmt))
    values = [*args, *kwargs.values()]
    if "*" in fmt or re.search(r"\{[^{}]*\{", fmt):
        widths += sum(map(_int, values))
    return len(fmt) + widths + text_size(values, limit)


def whole(args: tuple) -> tuple:
    """`args` with a first argument that is an iterator (a `map` or `select` result) read
    into a list, so that what a call builds from it can be estimated before it runs."""
    return (list(args[0]), *args[1:]) if args and isinstance(args[0], Iterator) else args


def join_size(items, separator, limit: int) -> int:
    items = list(items) if isinstance(items, (list, tuple)) else []
    return text_size(items, limit) + _str_len(separator) * len(items)


# What a call may build beyond its inputs, estimated from (value, args, kwargs, limit) before it
# runs, for the calls that can build far more: a width, a repeated separator, a replacement.
def _width(value, args, kwargs, limit):
    return _int(_arg(args, kwargs, 0, "width"))


def _replace(value, args, kwargs, limit):
    return _count(value, _arg(args, kwargs, 0, "old")) * _str_len(_arg(args, kwargs, 1, "new"))


def _indent(value, args, kwargs, limit):
    width = _arg(args, kwargs, 0, "width", 4)
    lines = value.count("\n") + 1 if isinstance(value, str) else 1
    return lines * (_int(width) or _str_len(width))


def _wordwrap(value, args, kwargs, limit):
    width = max(_int(_arg(args, kwargs, 0, "width", 79)), 1)
    return (_str_len(value) // width + 1) * _str_len(_arg(args, kwargs, 2, "wrapstring"))


def _urlize(value, args, kwargs, limit):
    extra = sum(_str_len(kwargs.get(key)) for key in ("target", "rel", "extra_schemes"))
    return (_str_len(value) // 4 + 1) * (extra + 64)


def _sum(value, args, kwargs, limit):
    start = _arg(args, kwargs, 1, "start", 0)
    if isinstance(start, (int, float)):
        return 0
    items = value if isinstance(value, (list, tuple)) else []
    return len(items) * text_size(items, limit)  # each `+` copies what was summed so far


def _text(value, args, kwargs, limit):
    return text_size(value, limit)


def _lipsum(args, kwargs):
    n = _int(_arg(args, kwargs, 0, "n", 5))
    most = _int(_arg(args, kwargs, 3, "max", 100))
    return n * most * 12  # words of up to 11 characters and a space


FILTER_GROWTH = {
    "center": _width, "indent": _indent, "replace": _replace, "wordwrap": _wordwrap,
    "urlize": _urlize, "sum": _sum, "string": _text, "tojson": _text, "pprint": _text,
    "join": lambda value, args, kwargs, limit: join_size(value, _arg(args, kwargs, 0, "d", ""),
                                                         limit),
    "format": lambda value, args, kwargs, limit: format_size(value, args, kwargs, limit),
}
STR_METHOD_GROWTH = {
    "center": _width, "ljust": _width, "rjust": _width, "zfill": _width, "replace": _replace,
    "expandtabs": lambda value, args, kwargs, limit:
        value.count("\t") * _int(_arg(args, kwargs, 0, "tabsize", 8)),
    "join": lambda value, args, kwargs, limit: join_size(_arg(args, kwargs, 0, "iterable"),
                                                         value, limit),
    "translate": lambda value, args, kwargs, limit: len(value) * max(
        [_str_len(v) for v in _arg(args, kwargs, 0, "table", {}).values()]
        if isinstance(_arg(args, kwargs, 0, "table"), dict) else [], default=1),
    "format": lambda value, args, kwargs, limit: format_size(value, args, kwargs, limit),
    "format_map": lambda value, args, kwargs, limit: format_size(value, args, kwargs, limit),
}


def render(text: str, variables: dict) -> str:
    """`text` rendered with `variables` in a fresh bounded sandbox (raises jinja2's
    TemplateError or TemplateLimitError)."""
    environment = bounded_environment(input_size(variables))
    try:
        template = environment.from_string(environment.counted_tree(text))
        return "".join(template.generate(**variables))
    except RecursionError:
        raise TemplateLimitError("the template recurses too deeply (a macro calling "
                                 "itself?)") from None


def bounded_environment(input_chars: int):
    """A Jinja2 sandbox set up as Hugging Face's chat templates expect (trim_blocks,
    lstrip_blocks, loop controls, a `tojson` that keeps unicode and `<`, `raise_exception`,
    `strftime_now`, the `{% generation %}` tag) with the two budgets of this module."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """HF's `{% generation %}...{% endgeneration %}` (assistant-token masks): its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if indent is not None and not (isinstance(indent, int) and 0 <= indent <= MAX_JSON_INDENT):
            raise TemplateLimitError(f"tojson indent must be an integer from 0 to "
                                     f"{MAX_JSON_INDENT}, got {indent!r}")
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def counter_call(name: str, args: list) -> nodes.Call:
        return nodes.Call(nodes.EnvironmentAttribute(name), args, [], None, None)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def __init__(self):
            super().__init__(autoescape=False, trim_blocks=True, lstrip_blocks=True,
                             extensions=[GenerationTag, loopcontrols])
            self.steps = 0
            self.size = 0
            self.max_size = MAX_TEMPLATE_SIZE + INPUT_SIZE_FACTOR * input_chars
            self.globals["range"] = self.counted_range
            self.globals["raise_exception"] = raise_exception
            self.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self.globals["lipsum"] = self.bounded_lipsum(self.globals["lipsum"])
            self.filters["tojson"] = tojson
            self.filters = {name: self.counted_filter(name, function)
                            for name, function in self.filters.items()}

        # ---- the budgets
        def count_step(self):
            self.steps += 1
            if self.steps > MAX_TEMPLATE_STEPS:
                raise TemplateLimitError(f"rendering took more than {MAX_TEMPLATE_STEPS} steps")

        def remaining(self) -> int:
            return self.max_size - self.size

        def check_planned(self, size: int, what: str):
            """Refuse an operation that would build `size` more than the budget left."""
            if size > self.remaining():
                raise TemplateLimitError(f"{what} would build about {size} characters or "
                                         f"items, past the render's budget of {self.max_size}")

        def counted(self, value, what: str):
            self.check_planned(built_size(value), what)
            self.size += built_size(value)
            return value

        # ---- the counters the rewritten tree calls
        def counted_tree(self, text: str) -> nodes.Template:
            """The syntax tree of `text` with every output piece, `~` and loop iterable
            passed through the counters below."""
            tree = self.parse(text)
            for output in tree.find_all(nodes.Output):
                output.nodes = [counter_call("counted_output", [child]) for child in output.nodes]
            for loop in tree.find_all(nodes.For):
                loop.iter = counter_call("counted_items", [loop.iter])
            for parent in tree.find_all(nodes.Node):
                for field in parent.fields:
                    child = getattr(parent, field)
                    if isinstance(child, nodes.Concat):
                        setattr(parent, field, counter_call("counted_concat", child.nodes))
                    elif isinstance(child, list):
                        setattr(parent, field, [counter_call("counted_concat", c.nodes)
                                                if isinstance(c, nodes.Concat) else c
                                                for c in child])
            return tree

        def counted_output(self, value):
            self.count_step()
            self.check_planned(text_size(value, self.remaining()), "an output")
            return self.counted(str(value), "an output")

        def counted_concat(self, *values):
            self.check_planned(text_size(list(values), self.remaining()), "'~'")
            return self.counted("".join(map(str, values)), "'~'")

        def counted_items(self, iterable):
            for item in iterable:
                self.count_step()
                yield item

        def counted_range(self, *args):
            for item in range(*args):
                self.count_step()
                yield item

        def counted_filter(self, name, function):
            growth = FILTER_GROWTH.get(name)
            # pass_context / pass_eval_context / pass_environment filters get that first
            passes_first = getattr(function, "jinja_pass_arg", None) is not None

            @functools.wraps(function)
            def run(*args, **kwargs):
                first = 1 if passes_first else 0
                if growth is not None and len(args) > first:
                    args = (*args[:first], *whole(args[first:]))
                    self.check_planned(growth(args[first], args[first + 1:], kwargs,
                                              self.remaining()), f"the {name} filter")
                return self.counted(function(*args, **kwargs), f"the {name} filter")

            return run

        def bounded_lipsum(self, lipsum):
            def run(*args, **kwargs):
                self.check_planned(_lipsum(args, kwargs), "lipsum")
                return lipsum(*args, **kwargs)

            return run

        # ---- the sandbox's hooks
        def getattr(self, obj, attribute):
            self.count_step()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self.count_step()
            value = super().getitem(obj, argument)
            return self.counted(value, "a slice") if isinstance(argument, slice) else value

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            target = getattr(__obj, "__self__", None)
            if target is __self:  # a counter of the rewritten tree: it counts itself
                return __obj(*args)  # (jinja2 adds _loop_vars and _block_vars)
            __self.count_step()
            # jinja2 wraps str.format and str.format_map (its own checks): the method within
            target = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            growth = (STR_METHOD_GROWTH.get(getattr(__obj, "__name__", ""))
                      if isinstance(target, str) else None)
            if growth is not None:
                args = whole(args)
                __self.check_planned(growth(target, args, kwargs, __self.remaining()),
                                     f"str.{__obj.__name__}")
            value = super().call(__context, __obj, *args, **kwargs)
            return __self.counted(value, "a call")

        def call_binop(self, context, operator, left, right):
            self.count_step()
            sizes = [built_size(x) for x in (left, right) if isinstance(x, (str, list, tuple))]
            counts = [x for x in (left, right) if isinstance(x, int)]
            if operator == "*" and sizes and counts:
                if sizes[0] * counts[0] > MAX_TEMPLATE_REPEAT:
                    raise TemplateLimitError(f"'*' would build more than {MAX_TEMPLATE_REPEAT} "
                                             f"items")
                self.check_planned(sizes[0] * counts[0], "'*'")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_POWER:
                raise TemplateLimitError(f"'**' with an exponent above {MAX_POWER}")
            if operator == "+":
                self.check_planned(sum(sizes), "'+'")
            if operator == "%" and isinstance(left, str):
                self.check_planned(format_size(left, right if isinstance(right, tuple)
                                               else (right,), {}, self.remaining()), "'%'")
            return self.counted(super().call_binop(context, operator, left, right),
                                f"'{operator}'")

    return BoundedSandbox()
