"""The HTTP application: routes, authentication, the request path, and errors in OpenAI's shape.

The request path, and where each part runs:

1. the event loop: the API key check (constant-time), readiness, reading the body (size-limited);
2. one tokenizer thread: JSON parsing and validation (pydantic), then ``Engine.tokenize``; one
   thread because a fast tokenizer's truncation settings are shared state (two threads tokenising
   with different ``truncate`` values would race on them);
3. the scheduler's worker thread: packed forwards (``Engine.embed_tokenized``), the only user of
   the model;
4. the event loop again: ``dimensions``, normalisation and the response body (large bodies in the
   default thread pool, so that one big response does not stall other clients), in numpy and orjson:
   nothing on the event loop calls into torch, whose ops release the GIL and would make the loop
   wait for the worker thread to hand it back.

Admission comes before work: the number of inputs, the characters of each and of the request are
checked on the parsed body (``protocol.InputLimits``), and tokenisation runs in chunks that stop as
soon as the request holds more tokens than the queue could ever admit, so a refused request costs the
tokenizer thread (and every client waiting behind it) little time and memory.

While a request waits for its forwards its connection is watched: a client that disconnects has its
queued inputs dropped, and one that disconnects while sending its body is counted as 499 too. Every
error is answered in OpenAI's shape (``protocol.APIError``).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..encoder import Engine, plan_batches
from ..inputs import InputTooLong, TokenizedExample
from . import protocol
from .metrics import Metrics
from .protocol import APIError, EmbeddingRequest, EmbedRequest
from .scheduler import NotAccepting, QueueFull, Scheduler, TooLarge

log = logging.getLogger("engine.serve")
JSON = "application/json"
INLINE_SERIALIZE_FLOATS = 1 << 16  # larger responses are serialised in the thread pool
# Tokenisation runs over at most this many inputs or characters at a time (one input may be longer),
# so that a request holding more tokens than the queue admits is refused after one chunk too many.
TOKENIZE_CHUNK_INPUTS = 256
TOKENIZE_CHUNK_CHARS = 1 << 16
INPUT_CHARS_PER_TOKEN = 32  # the default --max-input-chars per token of the input length
REQUEST_CHARS_PER_TOKEN = 16  # the default --max-request-chars per queueable token


@dataclass(frozen=True)
class Settings:
    """What the command line decides. ``max_request_bytes`` bounds a request body; a character
    limit left ``None`` is derived (:func:`input_limits`)."""

    served_model_name: str
    max_batch_tokens: int = 16384
    max_batch_size: int = 256
    max_queue_tokens: int = 262144
    max_request_bytes: int = 8 << 20
    max_client_batch_size: int = 2048
    max_input_chars: int | None = None
    max_request_chars: int | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class Prepared:
    """A validated, tokenised embedding request."""

    items: list[TokenizedExample]
    single: bool
    dimensions: int | None
    normalize: bool
    encoding_format: str | None  # None: the TEI response shape
    n_tokens: int


def request_bytes_limit(max_queue_tokens: int) -> int:
    """The body-size limit that goes with a queue limit: 32 bytes per queueable token (room for JSON
    escapes of non-ASCII text and token ids), at least 1 MiB."""
    return max(1 << 20, 32 * max_queue_tokens)


def input_limits(settings: Settings, max_input_length: int) -> protocol.InputLimits:
    """The request limits in force. Characters per input default to 32 per token the model reads:
    English averages about 4 characters per token, so only a text many times longer than what
    truncation keeps is refused. Characters per request default to 16 per queueable token, about four
    times what the queue holds at 4 characters per token (room for inputs that truncation shortens)."""
    chars, total = settings.max_input_chars, settings.max_request_chars
    return protocol.InputLimits(
        max_inputs=settings.max_client_batch_size,
        max_input_chars=INPUT_CHARS_PER_TOKEN * max_input_length if chars is None else chars,
        max_request_chars=REQUEST_CHARS_PER_TOKEN * settings.max_queue_tokens if total is None else total,
    )


class EmbeddingService:
    """The state behind the routes: the engine, its scheduler, metrics and the tokenizer thread."""

    def __init__(self, engine: Engine, settings: Settings, *, warmup: bool = True) -> None:
        self.engine, self.settings = engine, settings
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            engine.embed_tokenized, plan_batches, engine.hidden_size,
            max_batch_tokens=settings.max_batch_tokens, max_batch_size=settings.max_batch_size,
            max_queue_tokens=settings.max_queue_tokens,
            warmup=(lambda: engine.warmup(settings.max_batch_tokens)) if warmup else None,
            observer=self.metrics,
        )
        self.metrics.bind(self.scheduler)
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-tokenize")
        self.draining = False
        self.started_at = int(time.time())
        self._key_digest = _digest(settings.api_key) if settings.api_key is not None else None
        self.limits = input_limits(settings, engine.max_length)

    # -- checks on the event loop --------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if self._key_digest is None:
            return
        header = request.headers.get("authorization")
        if header is None:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(" ")
        # Compare digests: constant time whatever the lengths.
        if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(token.strip()), self._key_digest):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_accepting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Connection": "close"})
        if self.scheduler.failed is not None:
            raise APIError(503, "the server failed to warm up", code="unavailable")
        if not self.scheduler.ready.is_set():
            raise APIError(503, "the server is warming up", code="warming_up", headers={"Retry-After": "1"})

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"the request body of {int(length)} bytes exceeds the limit of {limit} bytes",
                           code="request_too_large", headers={"Connection": "close"})
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large",
                               headers={"Connection": "close"})
            chunks.append(chunk)
        return b"".join(chunks)

    # -- the tokenizer thread ------------------------------------------------------------------------

    def prepare_openai(self, body: bytes) -> Prepared:
        t0 = time.perf_counter()
        req = protocol.parse_request(EmbeddingRequest, body)
        name = self.settings.served_model_name
        if req.model is not None and req.model != name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        self._check_dimensions(req.dimensions)
        inputs = protocol.engine_inputs(req.input, "input", req.instruction, self.limits, self._prompt(None))
        return self._tokenize(t0, inputs, "input", truncate=True, prompt_name=None, dimensions=req.dimensions,
                              normalize=True, encoding_format=req.encoding_format)

    def prepare_tei(self, body: bytes) -> Prepared:
        t0 = time.perf_counter()
        req = protocol.parse_request(EmbedRequest, body)
        self._check_dimensions(req.dimensions)
        if req.prompt_name is not None and req.prompt_name not in self.engine.prompts:
            known = ", ".join(sorted(self.engine.prompts)) or "none are stored"
            raise APIError(422, f"prompt_name: unknown prompt {req.prompt_name!r} ({known})", param="prompt_name",
                           code="invalid_value")
        inputs = protocol.engine_inputs(req.inputs, "inputs", req.instruction, self.limits,
                                        self._prompt(req.prompt_name))
        return self._tokenize(t0, inputs, "inputs", truncate=req.truncate, prompt_name=req.prompt_name,
                              dimensions=req.dimensions, normalize=req.normalize, encoding_format=None)

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and dimensions > self.engine.hidden_size:
            raise APIError(422, f"dimensions: {dimensions} exceeds the model's {self.engine.hidden_size} dimensions",
                           param="dimensions", code="invalid_value")

    def _prompt(self, prompt_name: str | None) -> str:
        """What the engine prepends to every text for ``prompt_name`` (a known name or None)."""
        return self.engine.resolve_prompt(None, prompt_name) or ""

    def _tokenize(self, t0: float, inputs: protocol.EngineInputs, field: str, *, truncate: bool,
                  prompt_name: str | None, dimensions: int | None, normalize: bool,
                  encoding_format: str | None) -> Prepared:
        """Tokenise chunk by chunk; 413 as soon as the tokens so far exceed what the queue admits
        (the scheduler's own limit), before the rest of the request is tokenised."""
        t1 = time.perf_counter()
        limit = self.scheduler.max_queue_tokens
        items: list[TokenizedExample] = []
        n_tokens = 0
        for start, stop in _chunks(inputs.sizes):
            try:
                part = self.engine.tokenize(inputs.items[start:stop], prompt_name=prompt_name, truncate=truncate,
                                            allow_token_ids=True)
            except InputTooLong as exc:
                raise protocol.too_long_error(start + exc.index, exc.n_tokens, exc.limit, field, inputs.single) from None
            except (TypeError, ValueError) as exc:
                raise protocol.input_error(exc, field, inputs.single, offset=start) from None
            items.extend(part)
            n_tokens += sum(t.num_tokens for t in part)
            if n_tokens > limit:
                raise protocol.too_many_tokens_error(field, n_tokens, stop, len(inputs.items), limit)
        t2 = time.perf_counter()
        self.metrics.stage["parse"].observe(t1 - t0)
        self.metrics.stage["tokenize"].observe(t2 - t1)
        return Prepared(items, inputs.single, dimensions, normalize, encoding_format, n_tokens)

    # -- the request path ----------------------------------------------------------------------------

    async def embed(self, request: Request, kind: str) -> Response:
        self.check_key(request)
        self.check_accepting()
        body = await self.read_body(request)
        loop = asyncio.get_running_loop()
        prepare = self.prepare_openai if kind == "openai" else self.prepare_tei
        prepared = await loop.run_in_executor(self.tokenizer_thread, prepare, body)
        out = await self._run(request, prepared)
        if out is None:
            return Response(status_code=499)  # the client is gone (nginx's "client closed request")
        if out.size > INLINE_SERIALIZE_FLOATS:
            content = await loop.run_in_executor(None, self.serialize, prepared, out)
        else:
            content = self.serialize(prepared, out)
        return Response(content, media_type=JSON)

    async def _run(self, request: Request, prepared: Prepared) -> np.ndarray | None:
        """Queue the request's inputs and wait for its rows; None if the client disconnected first."""
        loop = asyncio.get_running_loop()
        settled: asyncio.Future = loop.create_future()

        def on_done(error: BaseException | None) -> None:  # the worker thread
            try:
                loop.call_soon_threadsafe(_settle, settled, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        try:
            job = self.scheduler.submit(prepared.items, on_done)
        except QueueFull as exc:
            raise APIError(429, f"too many queued tokens: {exc}; retry after {exc.retry_after} s",
                           code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
        except TooLarge as exc:
            raise APIError(413, str(exc), code="request_too_large") from None
        except NotAccepting as exc:
            raise APIError(503, str(exc), code="unavailable") from None
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((settled, gone), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise
        finally:
            gone.cancel()
        if not settled.done():
            dropped = self.scheduler.cancel(job)
            log.debug("client disconnected; %d queued inputs dropped", dropped)
            return None
        error = settled.result()
        if error is not None:
            raise APIError(500, f"the forward failed: {' '.join(str(error).split()) or type(error).__name__}",
                           code="inference_failed")
        return job.out

    def serialize(self, prepared: Prepared, out: np.ndarray) -> bytes:
        """Cut to ``dimensions``, L2-normalise (always for OpenAI), render the body."""
        t = time.perf_counter()
        rows = out if prepared.dimensions is None else out[:, :prepared.dimensions]
        if prepared.normalize:  # as torch.nn.functional.normalize: x / max(||x||, 1e-12), in float32
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-12))
        array = np.ascontiguousarray(rows, dtype=np.float32)
        if prepared.encoding_format is None:
            content = protocol.tei_body(array)
        else:
            content = protocol.openai_body(array, self.settings.served_model_name, prepared.n_tokens,
                                           prepared.encoding_format)
        self.metrics.stage["serialize"].observe(time.perf_counter() - t)
        return content

    # -- small endpoints -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        engine, s = self.engine, self.settings
        cfg = engine.config.model
        return {
            "model": s.served_model_name,
            "family": cfg.family,
            "attention": cfg.attention,
            "hidden_size": engine.hidden_size,
            "num_layers": cfg.num_layers,
            "pooling": engine.pooling,
            "max_input_length": engine.max_length,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "device": str(engine.device),
            "backend": engine.model.ops.name,
            "prompts": sorted(engine.prompts),
            "version": _version(),
            "ready": self.scheduler.accepting,
            "limits": {"max_batch_tokens": s.max_batch_tokens, "max_batch_size": s.max_batch_size,
                       "max_queue_tokens": s.max_queue_tokens, "max_request_bytes": s.max_request_bytes,
                       "max_client_batch_size": self.limits.max_inputs,
                       "max_input_chars": self.limits.max_input_chars,
                       "max_request_chars": self.limits.max_request_chars},
        }


def create_app(engine: Engine, settings: Settings, *, warmup: bool = True) -> FastAPI:
    """The FastAPI application serving ``engine``; the scheduler starts with the app's lifespan."""
    service = EmbeddingService(engine, settings, warmup=warmup)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.scheduler.start()
        yield
        # uvicorn has finished every accepted request by now; the queue is empty.
        await asyncio.get_running_loop().run_in_executor(None, service.scheduler.stop)
        service.tokenizer_thread.shutdown(wait=True)

    app = FastAPI(title="llm-encoder-engine embedding server", version=_version(), lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.service = service
    body_schema = {"requestBody": {"required": True, "content": {JSON: {"schema": EmbeddingRequest.model_json_schema()}}}}
    tei_schema = {"requestBody": {"required": True, "content": {JSON: {"schema": EmbedRequest.model_json_schema()}}}}

    @app.post("/v1/embeddings", openapi_extra=body_schema, summary="OpenAI embeddings")
    async def embeddings(request: Request) -> Response:
        return await service.embed(request, "openai")

    @app.post("/embed", openapi_extra=tei_schema, summary="text-embeddings-inference embed")
    async def embed(request: Request) -> Response:
        return await service.embed(request, "tei")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        service.check_key(request)
        entry = {"id": settings.served_model_name, "object": "model", "created": service.started_at,
                 "owned_by": "llm-encoder-engine"}
        return Response(protocol.json_body({"object": "list", "data": [entry]}), media_type=JSON)

    @app.get("/info")
    async def info(request: Request) -> Response:
        service.check_key(request)
        return Response(protocol.json_body(service.info()), media_type=JSON)

    @app.get("/health")
    async def health() -> Response:
        service.check_accepting()
        return Response(protocol.json_body({"status": "ok"}), media_type=JSON)

    # Probes often send HEAD; a second route, because one route with two methods duplicates its
    # OpenAPI operation id.
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return Response(exc.body(), status_code=exc.status, headers=exc.headers, media_type=JSON)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client closed the connection while sending its body: nobody reads an answer, and it is
        # no server error. Counted as 499 (nginx's "client closed request"), as a disconnect later on.
        log.debug("client disconnected while sending %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return Response(protocol.error_body(exc.status_code, message), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None), media_type=JSON)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return Response(protocol.error_body(500, "internal server error", code="internal_error"), status_code=500,
                        media_type=JSON)

    app.add_middleware(RequestMetrics, metrics=service.metrics)
    return app


class RequestMetrics:
    """ASGI wrapper counting every HTTP request by endpoint and status, with its duration. Pure ASGI
    (not a Starlette BaseHTTPMiddleware) so that ``receive`` reaches the routes untouched: the
    disconnect watch reads it."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(scope["path"], status, time.perf_counter() - start)


def _chunks(sizes: list[int]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` slices of consecutive inputs, each at most ``TOKENIZE_CHUNK_INPUTS`` inputs
    and ``TOKENIZE_CHUNK_CHARS`` characters, or one input."""
    start, chars = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start == TOKENIZE_CHUNK_INPUTS or chars + size > TOKENIZE_CHUNK_CHARS):
            yield start, i
            start, chars = i, 0
        chars += size
    yield start, len(sizes)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-encoder-engine")
    except PackageNotFoundError:  # run from a source checkout that was never installed
        return "0+source"
