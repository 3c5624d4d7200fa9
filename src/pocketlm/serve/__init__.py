"""`pocketlm serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

Modules: `app` (FastAPI routes, limits, auth, SSE; `create_app`, `ServerConfig`), `batching` (the scheduler
thread that owns the model and decodes every active request in one batched forward), `schemas` (request
validation into typed requests), `errors` (the OpenAI error envelope), `grammar` (JSON / JSON-schema
constrained decoding), `metrics` (Prometheus text), `commands` (the CLI verb), `static/index.html` (the chat
page, no build step).
"""
