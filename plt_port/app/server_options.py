"""The choices of `plt-port serve` that the server's routes read (no web framework here, so
the command line can name the defaults without importing the server)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_CHAT_MAX_TOKENS = 4096  # a chat that sets no limit (capped by the context left)
# a request body's bytes by default: the model's context of text at 32 bytes a token (JSON
# escapes of non-ASCII text take 6-12 bytes a character, a token id list 7 bytes a token;
# a 128k-token context: 4 MiB), and at least 1 MiB (tool schemas, a small model's chats)
REQUEST_BYTES_PER_TOKEN = 32
MIN_MAX_REQUEST_BYTES = 1 << 20


@dataclass
class ServerOptions:
    api_key: str | None = None
    allowed_origins: Sequence[str] = ()
    tool_call_parser: str | None = None   # a name of tool_parsers.TOOL_PARSERS
    reasoning_parser: str | None = None   # a name of reasoning.REASONING_PARSERS
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    max_request_bytes: int | None = None  # None: the default above

    def request_bytes_limit(self, context: int) -> int:
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return max(MIN_MAX_REQUEST_BYTES, REQUEST_BYTES_PER_TOKEN * context)
