"""HTTP routes by concern: OpenAI endpoints, operations, playground (``create_app`` mounts them)."""
