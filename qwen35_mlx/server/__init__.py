"""`qwen35-mlx serve`: OpenAI and Anthropic APIs and a chat page over one engine thread
(docs/ARCHITECTURE.md §15). Needs the `server` extra: pip install "qwen35-mlx[server]"."""
