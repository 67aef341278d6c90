"""The backend: one llama_cpp.server, started by `python -m backend serve`, for the proxy to call.

`models` finds the GGUF files, `config` turns settings into llama_cpp.server's config file, `app`
wraps llama_cpp.server's own app (never patching it) and `usage` adds the streamed usage chunk.
"""
