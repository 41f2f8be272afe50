"""The HTTP server: OpenAI- and Ollama-compatible routes over the batching engine."""
