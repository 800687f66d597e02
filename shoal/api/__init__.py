"""HTTP: the OpenAI-compatible API, the web chat page, health and metrics (FastAPI)."""
