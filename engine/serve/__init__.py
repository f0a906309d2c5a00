"""The embedding server: ``python -m engine.serve ENGINE_DIR``.

OpenAI's ``POST /v1/embeddings`` and text-embeddings-inference's ``POST /embed`` on FastAPI/uvicorn,
concurrent requests coalesced into packed token-budget forwards by one worker thread, admission
control by queued tokens, Prometheus metrics, graceful shutdown. Modules: ``protocol`` (request
models, input grammar, response bodies, errors), ``scheduler`` (queue, batching, worker),
``metrics``, ``app`` (routes and the request path), ``cli`` (options, startup, signals).
See docs/serving.md.
"""
