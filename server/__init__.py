"""HTTP layer: the OpenAI-compatible FastAPI app, its config and engine wiring."""
