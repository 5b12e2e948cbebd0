"""The application layer: the `plt-port` command line (`cli`, one module per command in
`commands/`) and the OpenAI/Anthropic-compatible HTTP server (`server`). Nothing below this
layer imports it."""
