"""memlm serve: an OpenAI-compatible HTTP server on the engine's continuous batching
(app.py: routes and response shapes; worker.py: the engine thread; protocol.py: request bodies;
metrics.py: Prometheus; page.html: the memory page)."""
