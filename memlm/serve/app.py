"""The OpenAI-compatible HTTP app: completions and chat completions (plain and SSE-streamed),
models, health, tokenize/detokenize, Prometheus metrics, and the memory page at `/`.

The model loads in the background after the server starts listening: /health answers 503 until
it is ready, as vLLM and llama-server do. Every error is OpenAI's error object with a 4xx/5xx
status; nothing a client sends reaches the engine thread unvalidated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memlm.cache.eviction import kv_record
from memlm.cache.policies import POLICIES, KVPolicy
from memlm.cache.spec import PolicySpec
from memlm.errors import InvalidRequestError, MemlmError, QueueFullError
from memlm.generation.request import Request as EngineRequest
from memlm.generation.request import StreamDelta
from memlm.latent.hook import latent_record
from memlm.lcm.hook import KEY as LCM_KEY
from memlm.serve.metrics import Metrics
from memlm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Common,
)
from memlm.serve.worker import EngineWorker, Job

log = logging.getLogger("memlm.serve")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat runs to the context's end


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def _error(status: int, message: str, type_: str, param: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class ServerState:
    """What the app serves: filled in by the loader thread once the model is ready."""

    served_name: str
    api_key: str | None
    max_batch: int
    max_queue: int
    engine: object | None = None
    worker: EngineWorker | None = None
    metrics: Metrics | None = None
    memories: dict[str, object] = field(default_factory=dict)
    predictor: object | None = None  # for kv_policy "learned"
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(
    load: Callable[[], tuple[object, dict[str, object], object | None]],
    served_name: str,
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
) -> FastAPI:
    """`load()` -> (engine, {memory name: LatentMemory}, learned-policy predictor or None); it runs
    in a background thread so the server can answer /health while the weights load."""
    state = ServerState(served_name, api_key, max_batch, max_queue)

    def loader():
        try:
            engine, memories, predictor = load()
            engine.scheduler.max_batch, engine.scheduler.max_queue = max_batch, max_queue
            state.metrics = Metrics(served_name)
            state.memories, state.predictor = memories, predictor
            worker = EngineWorker(engine, state.metrics)
            worker.start()
            state.engine, state.worker = engine, worker
        except Exception as e:  # noqa: BLE001  (reported by /health, not raised into uvicorn)
            log.exception("loading the model failed")
            state.load_error = f"{type(e).__name__}: {e}"

    async def lifespan(app):
        threading.Thread(target=loader, name="memlm-loader", daemon=True).start()
        yield
        if state.worker is not None:
            state.worker.stop()

    app = FastAPI(title="memlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.memlm = state

    # ---- errors: OpenAI's shape everywhere ---------------------------------------------------------

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", None
        return _error(400, f"{where}: {message}" if where else message, "invalid_request_error", where)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(e).__name__}", "server_error")

    # ---- guards ------------------------------------------------------------------------------------

    def ready():
        if state.engine is None:
            message = f"the model failed to load: {state.load_error}" if state.load_error else "the model is loading"
            raise APIError(503, message, "service_unavailable", headers={"Retry-After": "5"})
        return state.engine

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), state.api_key):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer KEY)", "authentication_error")

    def check_model(name: str | None) -> None:
        if name is not None and name != state.served_name:
            raise APIError(404, f"model {name!r} not found; this server serves {state.served_name!r}",
                           "not_found_error", "model")

    # ---- plain endpoints ---------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        ready()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
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
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        ready()
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        authorize(request)
        engine = ready()
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "invalid_request_error")
        if body.messages is not None:
            ids = _user_error(lambda: engine.encode_prompt([m.model_dump() | {"content": m.text()}
                                                            for m in body.messages]))
        else:
            ids = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.config.max_position_embeddings}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request):
        authorize(request)
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
        authorize(request)
        engine = ready()
        check_model(body.model)
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt is empty", "invalid_request_error", "prompt")
        return await _generate(state, engine, body, request, prompts, chat=False,
                               logprobs=body.logprobs, default_max=COMPLETIONS_DEFAULT_MAX_TOKENS)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        authorize(request)
        engine = ready()
        check_model(body.model)
        return await _generate(state, engine, body, request, [body.chat()], chat=True,
                               logprobs=body.logprob_count(), default_max=None)

    return app


def _policy_names(state: ServerState) -> list[str]:
    return [name for name in POLICIES if name != "learned" or state.predictor is not None]


def _user_error(fn):
    try:
        return fn()
    except InvalidRequestError as e:
        raise APIError(400, str(e), "invalid_request_error") from None


# ---- one generation request ---------------------------------------------------------------------------


def _policy(state: ServerState, body: _Common) -> KVPolicy | None:
    """The request's KV policy from kv_policy, kv_budget and kv_options (memlm.cache.spec), or None."""
    options = dict(body.kv_options or {})
    if "predictor" in options:  # a client never names a folder on the server
        raise InvalidRequestError("kv_options.predictor: the server's predictor is chosen at start (--kv-predictor)")
    if body.kv_policy is None:
        if body.kv_budget is not None or options:
            named = ", ".join(name for name in POLICIES if name != "full")
            raise InvalidRequestError(f"kv_budget needs a kv_policy ({named})")
        return None
    if body.kv_policy == "learned":
        if state.predictor is None:
            raise InvalidRequestError("kv_policy 'learned' needs a server started with --kv-predictor DIR")
        options["predictor"] = "--kv-predictor"  # the server's, loaded and checked at start
    return PolicySpec.from_options(body.kv_policy, body.kv_budget, options).build(state.predictor)


def _build(state: ServerState, engine, body: _Common, prompts: list, logprobs, default_max) -> list[EngineRequest]:
    """Validate everything and make the engine requests (prompt-major, then choice), or raise APIError."""
    memory = None
    if body.memory is not None:
        memory = state.memories.get(body.memory)
        if memory is None:
            loaded = ", ".join(sorted(state.memories)) or "none (start the server with --memory NAME=DIR)"
            raise APIError(404, f"memory {body.memory!r} not found; loaded: {loaded}", "not_found_error", "memory")
    requests = []
    try:
        policy = _policy(state, body)
        limit = engine.config.max_position_embeddings
        for prompt in prompts:
            ids = prompt if _is_ids(prompt) else engine.encode_prompt(prompt)
            if len(ids) >= limit:
                raise InvalidRequestError(
                    f"the prompt has {len(ids)} tokens but the model's context is {limit} tokens"
                )
            for choice in range(body.n):
                params = body.sampling_params(default_max or max(1, limit - len(ids)), choice, logprobs)
                requests.append(engine.make_request(ids, params, policy, memory))
    except MemlmError as e:
        raise APIError(400, str(e), "invalid_request_error") from None
    return requests


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


async def _generate(state: ServerState, engine, body: _Common, http: Request, prompts, chat, logprobs, default_max):
    requests = _build(state, engine, body, prompts, logprobs, default_max)
    loop = asyncio.get_running_loop()
    job = Job(requests, asyncio.Queue(), loop)
    try:
        state.worker.submit(job)
    except QueueFullError as e:
        raise APIError(503, str(e), "service_unavailable", headers={"Retry-After": "1"}) from None
    view = _View(state, engine, body, requests, chat, logprobs)
    if body.stream:
        return StreamingResponse(_sse(state, job, view), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await _wait(job)
    except BaseException:
        state.worker.abort(requests)
        raise
    return view.response()


async def _wait(job: Job) -> None:
    """Until every request of the job has delivered its last delta (or failed)."""
    done = set()
    while len(done) < len(job.requests):
        item = await job.queue.get()
        if isinstance(item, Exception):
            raise APIError(500, str(item), "server_error")
        if item is not None and item.finish_reason is not None:
            done.add(item.request.id)


async def _sse(state: ServerState, job: Job, view: _View) -> AsyncIterator[str]:
    """The stream: a role chunk per choice (chat), content chunks, exactly one finish chunk per choice,
    a usage chunk if asked, then [DONE]. A client that goes away aborts its requests at once."""
    try:
        for index in range(len(job.requests)):
            first = view.opening_chunk(index)
            if first is not None:
                yield _event(first)
        done = set()
        while len(done) < len(job.requests):
            item = await job.queue.get()
            if item is None:
                continue
            if isinstance(item, Exception):
                yield _event({"error": {"message": str(item), "type": "server_error", "param": None, "code": 500}})
                return
            if item.finish_reason is not None:
                done.add(item.request.id)
            chunk = view.delta_chunk(item)
            if chunk is not None:
                yield _event(chunk)
        if view.body.include_usage:
            yield _event(view.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        state.worker.abort(job.requests)  # no-op for finished requests


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _View:
    """Turns engine requests and deltas into OpenAI's response and chunk objects."""

    def __init__(self, state: ServerState, engine, body: _Common, requests, chat: bool, logprobs):
        self.state, self.engine, self.body, self.requests = state, engine, body, requests
        self.chat, self.logprobs = chat, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.choice_of = {r.id: i for i, r in enumerate(requests)}
        self.sent_tokens = [0] * len(requests)  # tokens whose logprobs were sent, per choice

    def _envelope(self, choices: list, **extra) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.state.served_name,
               "choices": choices}
        if self.body.stream:
            out["object"] = "chat.completion.chunk" if self.chat else "text_completion"
            if self.body.include_usage:
                out["usage"] = None
        out.update(extra)
        return out

    # ---- whole responses --------------------------------------------------------------------------

    def response(self) -> dict:
        choices = []
        for i, r in enumerate(self.requests):
            finish = r.finish_reason
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": r.text},
                          "logprobs": self._chat_logprobs(r, 0, len(r.logprobs)) if self.logprobs is not None else None,
                          "finish_reason": finish}
            else:
                choice = {"index": i, "text": r.text,
                          "logprobs": self._completion_logprobs(r, 0, len(r.logprobs))
                          if self.logprobs is not None else None,
                          "finish_reason": finish}
            if r.stop_reason is not None and finish == "stop":
                choice["stop_reason"] = r.stop_reason
            if self.body.return_memory_trace:
                choice["memory_trace"] = self._memory_trace(r)
            choices.append(choice)
        return self._envelope(choices, usage=self.usage())

    def usage(self) -> dict:
        prompt = sum(len(r.prompt_ids) for r in self.requests[:: self.body.n])  # each prompt once, as OpenAI
        completion = sum(len(r.output_ids) for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict:
        out = self._envelope([])
        out["usage"] = self.usage()
        return out

    # ---- stream chunks ----------------------------------------------------------------------------

    def opening_chunk(self, index: int) -> dict | None:
        """Chat: the first delta of each choice names the role. With return_memory_trace, the prompt's
        tokens (so a viewer can shade them as they are evicted) come with it."""
        r = self.requests[index]
        memory = self._prompt_memory(r) if self.body.return_memory_trace else None
        if not self.chat and memory is None:
            return None
        choice = {"index": index, "logprobs": None, "finish_reason": None}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""}
        else:
            choice["text"] = ""
        if memory is not None:
            choice["memory"] = memory
        return self._envelope([choice])

    def delta_chunk(self, d: StreamDelta) -> dict | None:
        r = d.request
        index = self.choice_of[r.id]
        wants_memory = self.body.return_memory_trace and (d.token_id is not None or d.evicted or d.inserted)
        new_logprobs = self.logprobs is not None and len(r.logprobs) > self.sent_tokens[index]
        if not (d.text or d.finish_reason or wants_memory or new_logprobs):
            return None
        choice = {"index": index}
        if self.chat:
            choice["delta"] = {"content": d.text} if d.text or not d.finish_reason else {}
        else:
            choice["text"] = d.text
        choice["logprobs"] = None
        if new_logprobs:
            start, self.sent_tokens[index] = self.sent_tokens[index], len(r.logprobs)
            if self.chat:
                choice["logprobs"] = self._chat_logprobs(r, start, len(r.logprobs))
            else:
                choice["logprobs"] = self._completion_logprobs(r, start, len(r.logprobs))
        choice["finish_reason"] = r.finish_reason if d.finish_reason else None
        if wants_memory:
            choice["memory"] = self._step_memory(d)
        if d.finish_reason and self.body.return_memory_trace:
            choice["memory_trace"] = self._memory_trace(r)
        return self._envelope([choice])

    # ---- logprobs ----------------------------------------------------------------------------------

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.engine.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_logprobs(self, r: EngineRequest, start: int, end: int) -> dict:
        content = []
        for k in range(start, end):
            text, raw = self._token(r.output_ids[k])
            top = []
            for token_id, value in (r.top_logprobs[k] if r.top_logprobs else []):
                alt_text, alt_raw = self._token(token_id)
                top.append({"token": alt_text, "logprob": value, "bytes": alt_raw})
            content.append({"token": text, "logprob": r.logprobs[k], "bytes": raw, "top_logprobs": top})
        return {"content": content}

    def _completion_logprobs(self, r: EngineRequest, start: int, end: int) -> dict:
        tokens, offsets, tops = [], [], []
        for k in range(start, end):
            tokens.append(self._token(r.output_ids[k])[0])
            offsets.append(r.text_ends[k - 1] if 0 < k <= len(r.text_ends) else (0 if k == 0 else len(r.text)))
            if r.top_logprobs:
                tops.append({self._token(t)[0]: v for t, v in r.top_logprobs[k]})
            else:
                tops.append(None)
        return {"tokens": tokens, "token_logprobs": r.logprobs[start:end], "top_logprobs": tops, "text_offset": offsets}

    # ---- memory --------------------------------------------------------------------------------------

    def _prompt_memory(self, r: EngineRequest) -> dict:
        decode = self.engine.tokenizer.decode
        return {
            "prompt_tokens": [decode([t], skip_special_tokens=False) for t in r.prompt_ids],
            "kv_policy": r.kv_policy.name if r.kv_policy is not None else "full",
            "kv_budget": r.kv_policy.budget if r.kv_policy is not None else None,
            "memory": self.body.memory,
        }

    def _step_memory(self, d: StreamDelta) -> dict:
        token = None
        if d.token_id is not None:
            token = self.engine.tokenizer.decode([d.token_id], skip_special_tokens=False)
        return {
            "token": token,
            "position": d.position,
            "evicted": d.evicted,
            "inserted": d.inserted,
            "kv_tokens": d.kv_tokens,
        }

    def _memory_trace(self, r: EngineRequest) -> dict:
        """Per token, prompt and output: is it still in the KV cache? Where latents went in; for an
        LCM, the reasoning loop behind each token. Read from each memory's record of the request."""
        decode = self.engine.tokenizer.decode
        kv, latent, lcm = kv_record(r), latent_record(r), r.records.get(LCM_KEY)
        evicted = set(kv.evicted_positions) if kv is not None else set()
        out = {
            "kv_policy": r.kv_policy.name if r.kv_policy is not None else "full",
            "kv_budget": r.kv_policy.budget if r.kv_policy is not None else None,
            "prompt_tokens": [{"token": decode([t], skip_special_tokens=False), "in_cache": p not in evicted}
                              for p, t in enumerate(r.prompt_ids)],
            "completion_tokens": [{"token": decode([t], skip_special_tokens=False), "in_cache": p not in evicted}
                                  for t, p in zip(r.output_ids, r.output_positions, strict=True)],
            "insertions": list(latent.insertions) if latent is not None else [],
            "evictions": len(evicted),
            "peak_kv_tokens": kv.peak_kv_tokens if kv is not None else 0,
        }
        if lcm is not None:  # an LCM: the reasoning loop behind each token
            out["codebook"] = lcm.trace
        return out
