"""The OpenAI-compatible HTTP app: completions and chat completions (plain and SSE-streamed, with
tool calls), the Responses and Messages APIs (adapters over chat), embeddings, models, health,
tokenize/detokenize, Prometheus metrics, and the memory page at `/`.

The model loads in the background after the server starts listening: /health answers 503 until
it is ready, as vLLM and llama-server do. Every error is OpenAI's error object with a 4xx/5xx
status; nothing a client sends reaches the engine thread unvalidated. Bodies over a size limit are
refused before they are parsed, prompts are tokenized off the event loop (a huge one cannot stall
other streams), and a client that goes away aborts its requests, streamed or not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from memlm.cache.policies import POLICIES, KVPolicy
from memlm.cache.spec import PolicySpec
from memlm.errors import InvalidRequestError, MemlmError, QueueFullError
from memlm.generation.request import Request as EngineRequest
from memlm.serve.chat import ToolPlan, render_chat
from memlm.serve.encoding import PromptEncoder
from memlm.serve.errors import APIError, error_response
from memlm.serve.limits import BodyLimit
from memlm.serve.messages_api import CountTokensRequest, MessageBuilder, MessagesRequest, anthropic_error
from memlm.serve.messages_api import chat_request as messages_chat
from memlm.serve.metrics import Metrics
from memlm.serve.openapi import document_errors
from memlm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    StreamOptions,
    TokenizeRequest,
    _Common,
)
from memlm.serve.responses_api import ResponseBuilder, ResponsesRequest, ResponseStore, conversation_of
from memlm.serve.responses_api import chat_request as responses_chat
from memlm.serve.view import ChatView
from memlm.serve.worker import EmbeddingJob, EngineWorker, Job, ServerStopping

log = logging.getLogger("memlm.serve")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat runs to the context's end


@dataclass
class ServeOptions:
    """How the server treats its clients (memlm serve's flags)."""

    api_key: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    max_tokens_default: int | None = None  # chat without max_tokens: this many (None: to the context's end)
    max_tokens_cap: int | None = None  # a request asking for more is refused (400)
    max_body_bytes: int = 8 << 20  # bodies beyond it are refused (413) before they are parsed
    public_metrics: bool = False  # with an API key: /metrics without it too
    allowed_origins: list[str] = field(default_factory=list)  # CORS (empty: no CORS headers)


@dataclass
class ServerState:
    """What the app serves: filled in by the loader thread once the model is ready."""

    served_name: str
    options: ServeOptions
    engine: object | None = None
    worker: EngineWorker | None = None
    metrics: Metrics | None = None
    memories: dict[str, object] = field(default_factory=dict)
    predictor: object | None = None  # for kv_policy "learned"
    encoder: PromptEncoder | None = None
    responses: ResponseStore = field(default_factory=ResponseStore)  # for previous_response_id
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def shut_down(self) -> None:
        """The process got SIGINT/SIGTERM: in-flight requests end now (503), so uvicorn's graceful
        shutdown finds no handler to cancel."""
        if self.worker is not None:
            self.worker.shutdown()


def create_app(
    load: Callable[[], tuple[object, dict[str, object], object | None]],
    served_name: str,
    options: ServeOptions | None = None,
) -> FastAPI:
    """`load()` -> (engine, {memory name: LatentMemory}, learned-policy predictor or None); it runs
    in a background thread so the server can answer /health while the weights load."""
    options = options or ServeOptions()
    state = ServerState(served_name, options)

    def loader():
        try:
            engine, memories, predictor = load()
            engine.scheduler.max_batch, engine.scheduler.max_queue = options.max_batch, options.max_queue
            state.metrics = Metrics(served_name)
            state.encoder = PromptEncoder(engine.tokenizer, engine.config.max_position_embeddings)
            state.memories, state.predictor = memories, predictor
            worker = EngineWorker(engine, state.metrics)
            worker.start()
            state.engine, state.worker = engine, worker
        except Exception as e:  # noqa: BLE001  (reported by /health, not raised into uvicorn)
            log.exception("loading the model failed")
            state.load_error = f"{type(e).__name__}: {e}"

    async def lifespan(app):
        threading.Thread(target=loader, name="memlm-loader", daemon=True).start()
        try:
            yield
        finally:
            if state.worker is not None:
                state.worker.stop()

    open_paths = {"/health", "/", "/openapi.json"} | ({"/metrics"} if options.public_metrics else set())

    async def authorize(request: Request) -> None:
        """Every route but the open ones needs the key; a route dependency, so it runs before the body
        is validated (an unauthenticated client learns nothing about its body). async: a plain
        function would be sent to the thread pool for every request."""
        if options.api_key is None or request.url.path in open_paths:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            token = request.headers.get("x-api-key", "")  # Anthropic's clients send the key so
        if not token or not secrets.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer KEY, or x-api-key: KEY)",
                           "authentication_error",
                           headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key")

    app = FastAPI(title="memlm", lifespan=lifespan, docs_url=None, redoc_url=None,
                  dependencies=[Depends(authorize)])
    app.state.memlm = state
    document_errors(app, options.public_metrics)
    if options.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"],
                           max_age=600)
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)

    # ---- errors: OpenAI's shape everywhere ---------------------------------------------------------

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.headers, e.code, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", None
        return error_response(400, f"{where}: {message}" if where else message, "invalid_request_error", where,
                      path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers,  # 405 keeps its Allow header
                      path=request.url.path)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error", path=request.url.path)

    # ---- guards ------------------------------------------------------------------------------------

    def ready():
        if state.engine is None:
            message = f"the model failed to load: {state.load_error}" if state.load_error else "the model is loading"
            raise APIError(503, message, "service_unavailable", headers={"Retry-After": "5"})
        return state.engine

    def check_model(name: str | None) -> None:
        _adapter_of(state, name)  # an unknown model or adapter: 404 model_not_found

    # ---- plain endpoints ---------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        ready()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        engine = ready()
        card = {
            "id": state.served_name,
            "object": "model",
            "created": state.created,
            "owned_by": "memlm",
            "max_model_len": engine.config.max_position_embeddings,
            "memories": sorted(state.memories),
            "kv_policies": _policy_names(state),
        }
        # Each LoRA adapter is a model of its own to clients (vLLM's shape: `parent` names the base).
        adapters = [{**card, "id": name, "parent": state.served_name} for name in sorted(engine.adapters)]
        return {"object": "list", "data": [card, *adapters]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request):
        """Prometheus text format. With an API key it needs the key too, unless --public-metrics."""
        ready()
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        engine = ready()
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "invalid_request_error")
        if body.messages is not None:
            chat = ChatCompletionRequest(messages=body.messages, tools=body.tools)
            ids = (await _off_loop(render_chat, engine, chat, state.encoder.encode))[0]
        else:
            ids = await _off_loop(state.encoder.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.config.max_position_embeddings}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request):
        engine = ready()
        check_model(body.model)
        if any(t < 0 or t >= engine.config.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {engine.config.vocab_size})", "invalid_request_error",
                           "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("memlm.serve").joinpath("page.html").read_text()

    # ---- generation --------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = ready()
        check_model(body.model)
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt is empty", "invalid_request_error", "prompt")

        def encode():
            return [p if _is_ids(p) else _encode_text(state, p) for p in prompts], None

        return await _generate(state, engine, body, request, encode, chat=False, logprobs=body.logprobs,
                               default_max=COMPLETIONS_DEFAULT_MAX_TOKENS)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = ready()
        check_model(body.model)
        return await _generate(state, engine, body, request, _chat_prompt(state, engine, body), chat=True,
                               logprobs=body.logprob_count(), default_max=options.max_tokens_default)

    # ---- the Responses and Messages APIs: adapters over chat completions ----------------------------

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        engine = ready()
        check_model(body.model)
        previous = None
        if body.previous_response_id is not None:
            stored = state.responses.get(body.previous_response_id)
            if stored is None:
                raise APIError(404, f"previous response {body.previous_response_id!r} not found (the server keeps "
                               f"the last {state.responses.limit} stored responses, in memory)", "not_found_error",
                               "previous_response_id")
            previous = stored[1]
        conversation = _user_error(lambda: conversation_of(body, previous))
        chat = _user_error(lambda: _validated(lambda: responses_chat(body, conversation)))
        builder = ResponseBuilder(body, body.model or state.served_name)
        if body.stream:
            chat.stream_options = StreamOptions(include_usage=True)
        job, view = await _start(state, engine, chat, _chat_prompt(state, engine, chat), True, None,
                                 options.max_tokens_default)

        def keep(response: dict) -> None:
            if body.store:
                state.responses.put(response, builder.conversation_after(conversation, response))

        if not body.stream:
            if not await _finish(state, job, request):
                return Response(status_code=499)
            response = builder.from_chat(view.response())
            keep(response)
            return response

        async def events():
            for event in builder.opening():
                yield event
            chunks = _chunks(state, job, view)
            try:
                async for chunk in chunks:
                    if "error" in chunk:
                        yield builder.event("error", code=None, message=chunk["error"]["message"], param=None)
                        return
                    for event in builder.on_chunk(chunk):
                        yield event
                closing, response = builder.closing()
                keep(response)
                for event in closing:
                    yield event
            finally:
                await chunks.aclose()

        return _streaming(events())

    @app.get("/v1/responses/{response_id}")
    async def stored_response(response_id: str, request: Request):
        stored = state.responses.get(response_id)
        if stored is None:
            raise APIError(404, f"response {response_id!r} not found", "not_found_error")
        return stored[0]

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request):
        engine = ready()
        check_model(body.model)
        chat = _user_error(lambda: _validated(lambda: messages_chat(body)))
        builder = MessageBuilder(body, body.model or state.served_name)
        if body.stream:
            chat.stream_options = StreamOptions(include_usage=True)
        job, view = await _start(state, engine, chat, _chat_prompt(state, engine, chat), True, None,
                                 options.max_tokens_default)
        if not body.stream:
            if not await _finish(state, job, request):
                return Response(status_code=499)
            return builder.from_chat(view.response())

        async def events():
            for event in builder.opening(len(job.requests[0].prompt_ids)):
                yield event
            chunks = _chunks(state, job, view)
            try:
                async for chunk in chunks:
                    if "error" in chunk:
                        payload = anthropic_error(500, chunk["error"]["message"])
                        yield f"event: error\ndata: {json.dumps(payload)}\n\n"
                        return
                    for event in builder.on_chunk(chunk):
                        yield event
                for event in builder.closing():
                    yield event
            finally:
                await chunks.aclose()

        return _streaming(events())

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest, request: Request):
        engine = ready()
        check_model(body.model)
        chat = _user_error(lambda: _validated(lambda: messages_chat(body)))
        ids, _ = await _off_loop(render_chat, engine, chat, state.encoder.encode)
        return {"input_tokens": len(ids)}

    # ---- embeddings ------------------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        """Mean of the last hidden states, L2-normalised (memlm.generation.embedding)."""
        engine = ready()
        if _adapter_of(state, body.model) is not None:
            raise APIError(400, "embeddings come from the base model; give its name or no model",
                           "invalid_request_error", "model")
        inputs = body.inputs()
        width, limit, vocab = engine.config.hidden_size, engine.config.max_position_embeddings, engine.config.vocab_size
        if not inputs or len(inputs) > 2048:
            raise APIError(400, "input must hold 1 to 2048 items", "invalid_request_error", "input")
        if body.dimensions is not None and body.dimensions != width:
            raise APIError(400, f"dimensions: this model's embeddings have {width} dimensions and its mean pooling "
                           "cannot be shortened", "invalid_request_error", "dimensions")

        def encode() -> list[list[int]]:
            out = []
            for i, item in enumerate(inputs):
                ids = item if isinstance(item, list) else _user_error(
                    lambda item=item, i=i: state.encoder.encode(item, what=f"input[{i}]"))
                if not ids:
                    raise APIError(400, f"input[{i}] is empty", "invalid_request_error", "input")
                if len(ids) > limit:
                    raise APIError(400, f"input[{i}] has {len(ids)} tokens but the model's context is {limit}",
                                   "invalid_request_error", "input")
                if min(ids) < 0 or max(ids) >= vocab:
                    raise APIError(400, f"input[{i}]: token ids must be in [0, {vocab})", "invalid_request_error",
                                   "input")
                out.append(ids)
            return out

        ids = await run_in_threadpool(encode)
        loop = asyncio.get_running_loop()
        job = EmbeddingJob(ids, loop.create_future(), loop)
        try:
            state.worker.submit_embeddings(job)
        except ServerStopping as e:
            raise APIError(503, str(e), "service_unavailable") from None
        try:
            vectors = await job.future
        except asyncio.CancelledError:
            job.future.cancel()
            raise
        except MemlmError as e:
            raise APIError(400, str(e), "invalid_request_error") from None
        data = []
        for i, vector in enumerate(vectors):
            if body.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes, base64
                value = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(x) for x in ids)
        return {"object": "list", "data": data, "model": state.served_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


def _encode_text(state: ServerState, text: str) -> list[int]:
    if not text.strip():
        raise InvalidRequestError("prompt is empty")
    return state.encoder.encode(text)


def _adapter_of(state: ServerState, name: str | None) -> str | None:
    """A request's `model` -> the LoRA adapter it selects (`NAME` or `BASE:NAME`), None for the base
    model; any other name is a 404 model_not_found (as OpenAI answers an unknown model)."""
    if name is None or name == state.served_name:
        return None
    adapters = state.engine.adapters
    adapter = name.removeprefix(state.served_name + ":")
    if adapter in adapters:
        return adapter
    served = f"{state.served_name!r}" + (f" and the adapters {', '.join(sorted(adapters))}" if adapters else "")
    raise APIError(404, f"model {name!r} not found; this server serves {served}", "not_found_error", "model",
                   code="model_not_found")


def _policy_names(state: ServerState) -> list[str]:
    return [name for name in POLICIES if name != "learned" or state.predictor is not None]


async def _off_loop(fn, *args, **kwargs):
    """fn(*args, **kwargs) in the thread pool (tokenizing is CPU work the event loop must not wait
    on); a user's mistake becomes a 400."""
    return await run_in_threadpool(lambda: _user_error(lambda: fn(*args, **kwargs)))


def _validated(fn):
    """fn() builds a request body in code (an adapter's chat request): its validation errors are the
    client's, so they become InvalidRequestError (-> 400) rather than a 500."""
    try:
        return fn()
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        raise InvalidRequestError(f"{where}: {message}" if where else message) from None


def _user_error(fn):
    try:
        return fn()
    except MemlmError as e:
        raise APIError(400, str(e), "invalid_request_error") from None


# ---- one generation request ---------------------------------------------------------------------------


def _policy(state: ServerState, body: _Common) -> KVPolicy | None:
    """The request's KV policy from kv_policy, kv_budget and kv_options (memlm.cache.spec), or None."""
    options = dict(body.kv_options or {})
    if "predictor" in options:  # a client never names a folder on the server
        raise InvalidRequestError("kv_options.predictor: the server's predictor is chosen at start (--kv-predictor)")
    for option in ("press", "press_ratio"):  # the press has its own request fields
        if option in options:
            raise InvalidRequestError(f"kv_options.{option}: use the request's kv_{option}")
    if body.kv_policy is None:
        if body.kv_budget is not None or options:
            named = ", ".join(name for name in POLICIES if name != "full")
            raise InvalidRequestError(f"kv_budget needs a kv_policy ({named})")
        if body.kv_press is None and body.kv_press_ratio is None:
            return None
    for name, kind in ((body.kv_policy, "kv_policy"), (body.kv_press, "kv_press")):
        if name == "learned":
            if state.predictor is None:
                raise InvalidRequestError(f"{kind} 'learned' needs a server started with --kv-predictor DIR")
            options["predictor"] = "--kv-predictor"  # the server's, loaded and checked at start
    options.update(press=body.kv_press, press_ratio=body.kv_press_ratio)
    return PolicySpec.from_options(body.kv_policy, body.kv_budget, options).build(state.predictor)


def _build(state: ServerState, engine, body: _Common, prompts: list[list[int]], logprobs, default_max,
           plan: ToolPlan | None) -> list[EngineRequest]:
    """Validate everything and make the engine requests (prompt-major, then choice), or raise APIError."""
    options = state.options
    memory = None
    if body.memory is not None:
        memory = state.memories.get(body.memory)
        if memory is None:
            loaded = ", ".join(sorted(state.memories)) or "none (start the server with --memory NAME=DIR)"
            raise APIError(404, f"memory {body.memory!r} not found; loaded: {loaded}", "not_found_error", "memory")
    asked = body.max_output_tokens
    cap = options.max_tokens_cap
    if cap is not None and asked is not None and asked > cap:
        raise APIError(400, f"max_tokens is {asked} but this server allows at most {cap} (--max-tokens-cap)",
                       "invalid_request_error", "max_tokens")
    if len(prompts) * body.n > options.max_queue:  # could never be queued: not "busy", a bad request
        raise APIError(400, f"this request makes {len(prompts) * body.n} generations (prompts x n) but the "
                       f"server queues at most {options.max_queue} (--max-queue)", "invalid_request_error", "n")
    adapter = _adapter_of(state, body.model)
    requests = []
    try:
        policy = _policy(state, body)
        limit = engine.config.max_position_embeddings
        vocab = engine.config.vocab_size
        if any(t >= vocab for t in body.token_bias()):
            raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {vocab})")
        response_format = plan.response_format() if plan is not None else None
        for ids in prompts:
            if len(ids) >= limit:
                raise InvalidRequestError(
                    f"the prompt has {len(ids)} tokens but the model's context is {limit} tokens"
                )
            default = default_max or limit - len(ids)
            if cap is not None:
                default = min(default, cap)
            for choice in range(body.n):
                params = body.sampling_params(max(1, default), choice, logprobs, response_format)
                requests.append(engine.make_request(ids, params, policy, memory, adapter=adapter))
    except MemlmError as e:
        raise APIError(400, str(e), "invalid_request_error") from None
    return requests


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _chat_prompt(state: ServerState, engine, body: ChatCompletionRequest):
    """A chat request's `encode` for _start: -> ([its token ids], its ToolPlan)."""
    def encode():
        ids, plan = render_chat(engine, body, state.encoder.encode)
        return [ids], plan

    return encode


async def _start(state: ServerState, engine, body: _Common, encode, chat, logprobs,
                 default_max) -> tuple[Job, ChatView]:
    """Build and queue the engine requests of one HTTP request -> its job and the view that formats it.
    `encode()` -> (the token-id prompts, a ToolPlan or None). Tokenizing and building run in one trip
    to the thread pool: off the event loop (a long prompt must not stall it), and one hand-off only
    (each costs milliseconds of scheduling on a busy machine)."""

    def prepare():
        prompts, plan = _user_error(encode)
        return _build(state, engine, body, prompts, logprobs, default_max, plan), plan

    requests, plan = await run_in_threadpool(prepare)
    loop = asyncio.get_running_loop()
    job = Job(requests, asyncio.Queue(), loop)
    try:
        state.worker.submit(job)
    except (QueueFullError, ServerStopping) as e:
        raise APIError(503, str(e), "service_unavailable", headers={"Retry-After": "1"}) from None
    return job, ChatView(state, engine, body, requests, chat, logprobs, plan)


async def _generate(state: ServerState, engine, body: _Common, http: Request, encode, chat, logprobs, default_max):
    """OpenAI's completions and chat completions: the whole answer, or its SSE stream."""
    job, view = await _start(state, engine, body, encode, chat, logprobs, default_max)
    if body.stream:
        return _streaming(_sse(state, job, view))
    if not await _finish(state, job, http):
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    return view.response()


def _streaming(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _finish(state: ServerState, job: Job, http: Request) -> bool:
    """Wait for a job's last token -> True; or, if the client goes away first (or the server is
    stopping), abort its requests -> False. A failed step raises its APIError."""
    waiting = asyncio.ensure_future(_wait(job))
    watching = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not waiting.done():  # the client went away (or the server is stopping): stop generating
            waiting.cancel()
            state.worker.abort(job.requests)
    if not waiting.done() or waiting.cancelled():
        return False
    waiting.result()  # raises a failed step's error
    return True


async def _disconnected(http: Request) -> None:
    """Returns when the client closes its connection. The body was read already, so the next ASGI
    message is the disconnect (uvicorn sends it as soon as it sees the socket close)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _wait(job: Job) -> None:
    """Until every request of the job has delivered its last delta (or failed)."""
    done = set()
    while len(done) < len(job.requests):
        item = await job.queue.get()
        if isinstance(item, ServerStopping):
            raise APIError(503, str(item), "service_unavailable")
        if isinstance(item, Exception):
            raise APIError(500, str(item), "server_error")
        if item is not None and item.finish_reason is not None:
            done.add(item.request.id)


async def _chunks(state: ServerState, job: Job, view: ChatView) -> AsyncIterator[dict]:
    """OpenAI's stream chunks as dicts: a role chunk per choice (chat), content chunks, exactly one
    finish chunk per choice, a usage chunk if asked; an {"error": ...} chunk ends it early. Other
    APIs' streams (Responses, Messages) are translations of these. A client that goes away (the
    consumer is closed) aborts the requests at once."""
    try:
        for index in range(len(job.requests)):
            first = view.opening_chunk(index)
            if first is not None:
                yield first
        done = set()
        while len(done) < len(job.requests):
            item = await job.queue.get()
            if item is None:
                continue
            if isinstance(item, Exception):
                yield {"error": {"message": str(item), "type": "server_error", "param": None, "code": None}}
                return
            if item.finish_reason is not None:
                done.add(item.request.id)
            chunk = view.delta_chunk(item)
            if chunk is not None:
                yield chunk
        if view.body.include_usage:
            yield view.usage_chunk()
    finally:
        state.worker.abort(job.requests)  # no-op for finished requests


async def _sse(state: ServerState, job: Job, view: ChatView) -> AsyncIterator[str]:
    """OpenAI's SSE framing of the chunks, then [DONE]."""
    chunks = _chunks(state, job, view)
    try:
        async for chunk in chunks:
            yield _event(chunk)
            if "error" in chunk:
                return
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
