"""The OpenAI-compatible API gateway: routes (thin), serving logic, SSE encoding, auth and limits."""
