"""The choices of `plt-port serve` that the server's routes read (no web framework here, so
the command line can name the defaults without importing the server)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_CHAT_MAX_TOKENS = 4096  # a chat that sets no limit (capped by the context left)
# a request body's bytes: a 128k-token context of text at 32 bytes a token (JSON escapes of
# non-ASCII text take 6-12 bytes a character; a token id list 7 bytes a token)
DEFAULT_MAX_REQUEST_BYTES = 128 * 1024 * 32


@dataclass
class ServerOptions:
    api_key: str | None = None
    allowed_origins: Sequence[str] = ()
    tool_call_parser: str | None = None   # a name of tool_parsers.TOOL_PARSERS
    reasoning_parser: str | None = None   # a name of reasoning.REASONING_PARSERS
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
