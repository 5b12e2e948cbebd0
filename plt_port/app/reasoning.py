"""Reasoning parsers: the `<think>...</think>` block a thinking model writes before its answer.

`REASONING_PARSERS` names the tags (`--reasoning-parser qwen3`, vLLM's name and field:
`reasoning_content`). A block is read when the answer opens with the start tag (after
whitespace), or from the first token when the rendered prompt already ends with the start
tag (templates that open the block for the model). Everything up to the end tag is
reasoning (without the whitespace around it); the rest, from its first non-space
character, is the answer. A block that never ends is all reasoning (an answer cut by
max_tokens while thinking). A start tag anywhere else is text.

`split_reasoning` reads a whole answer; `ReasoningStream` the same answer in pieces cut
anywhere, with the same result (tested at every character and token boundary).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tool_parsers import partial_tag_length


@dataclass(frozen=True)
class ThinkTags:
    start: str
    end: str


REASONING_PARSERS = {"qwen3": ThinkTags("<think>", "</think>")}


def prompt_opens_block(prompt_text: str, tags: ThinkTags) -> bool:
    return prompt_text.rstrip().endswith(tags.start)


def split_reasoning(text: str, tags: ThinkTags, opened: bool) -> tuple[str, str]:
    """(reasoning, content) of a whole answer; `opened`: the prompt opened the block."""
    if not opened:
        if not text.lstrip().startswith(tags.start):
            return "", text
        text = text.lstrip()[len(tags.start):]
    inner, closed, rest = text.partition(tags.end)
    return (inner.strip(), rest.lstrip()) if closed else (inner.lstrip(), "")


class ReasoningStream:
    """`feed(text)` / `finish()` -> (reasoning delta, content delta)."""

    def __init__(self, tags: ThinkTags, opened: bool):
        self.tags = tags
        self.state = "reasoning" if opened else "opening"  # then "content"
        self.pending = ""
        self.leading = True   # whitespace at the start of reasoning or of content is layout

    def feed(self, text: str) -> tuple[str, str]:
        self.pending += text
        reasoning = content = ""
        if self.state == "opening":
            head = self.pending.lstrip()
            if head.startswith(self.tags.start):
                self.pending, self.state = head[len(self.tags.start):], "reasoning"
            elif not self.tags.start.startswith(head):
                self.state = "content"
                self.leading = False  # no block: the answer is the text as written
        if self.state == "reasoning":
            reasoning = self._reasoning()
        if self.state == "content":
            content, self.pending = self._strip_leading(self.pending), ""
        return reasoning, content

    def _reasoning(self) -> str:
        end = self.pending.find(self.tags.end)
        if end >= 0:
            out = self._strip_leading(self.pending[:end]).rstrip()
            self.pending, self.state, self.leading = self.pending[end + len(self.tags.end):], \
                "content", True
            return out
        held = partial_tag_length(self.pending, self.tags.end)
        sure = self.pending[:len(self.pending) - held]
        sure_text = sure.rstrip()  # whitespace before the end tag is layout
        out = self._strip_leading(sure_text)
        self.pending = self.pending[len(sure_text):]
        return out

    def _strip_leading(self, text: str) -> str:
        if self.leading:
            text = text.lstrip()
            self.leading = not text
        return text

    def finish(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        if self.state == "reasoning":
            return self._strip_leading(rest), ""
        if self.state == "opening":
            return "", rest
        return "", self._strip_leading(rest)
