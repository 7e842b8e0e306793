"""Servers that let other tools use rlm: ``rlm serve`` (OpenAI-compatible HTTP) and ``rlm mcp``.

One module per concept: ``openai_server`` (the HTTP API), ``mcp_server`` (the MCP tools),
``runs`` (running queries over one shared client pair, progress), ``sessions`` (REPL
sessions driven by an agent), ``paths`` (which files a client may read) and ``auth``
(the bearer key and the loopback rule). Importing this package imports none of them.
"""
