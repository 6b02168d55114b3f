"""HTTP service: OpenAI-compatible API, metrics, engine thread."""
