"""The OpenAI-compatible HTTP API (FastAPI): routes, auth, body limit, errors.

Design choices:
- Request bodies are read and parsed here (`json.loads` with NaN/Infinity refused,
  then pydantic), so that every malformed body, whatever its kind (not JSON, not an
  object, too deep, wrong types), is one 400 with an OpenAI-style error body; no
  client input reaches a 5xx.
- Two pure ASGI middlewares wrap every route: `ApiKeyMiddleware` (outermost: with an
  API key, every path but /health needs `Authorization: Bearer KEY`, compared with
  `hmac.compare_digest`) and `BodyLimitMiddleware` (413 from Content-Length, or as
  soon as a chunked body passes the limit, before the route reads it).
- Generation goes through the `Scheduler`; the route awaits its events. A watcher
  task reads the ASGI channel for `http.disconnect`, streaming or not, and cancels
  the request in the scheduler, so a client that leaves frees its row at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import replace
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2.exceptions import TemplateError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from graftlm.serve.registry import AdapterRequestError, check_adapter_name
from graftlm.engine import Request as EngineRequest, SamplingParams, row_seed
from graftlm.serve.scheduler import QueueFull
from graftlm.serve.schemas import (ChatCompletionRequest, CompletionRequest, LoadAdapterRequest,
                                   error_body, validation_error)

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a context


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status)


# -- middlewares ----------------------------------------------------------------------

async def _send_error(send, status: int, message: str, code: str, type_: str, headers=()) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.expected is None or scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            return await _send_error(send, 401, "missing or invalid API key (Authorization: Bearer KEY)",
                                     "invalid_api_key", "authentication_error",
                                     [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is larger than {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_error(send, 413, message, "body_too_large", "invalid_request_error")
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, 413, message, "body_too_large", "invalid_request_error")


# -- helpers ----------------------------------------------------------------------------

def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def _parse(request: Request, model):
    body = await request.body()
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON ({str(e)[:200]})", code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        param, message = validation_error(e.errors(include_url=False, include_input=False))
        raise APIError(400, message, param=param, code="invalid_value")
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json")


def _now() -> int:
    return int(time.time())


async def _wait_for_disconnect(request: Request, on_disconnect) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


def _sse(data) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


# -- the app ----------------------------------------------------------------------------

def create_app(backend, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """`backend`: a `graftlm.serve.backend.ServeBackend` (or anything with its attributes)."""
    app = FastAPI(title="graftlm", version="0.1.0")
    app.state.backend = backend
    registry, scheduler = backend.registry, backend.scheduler

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(AdapterRequestError)
    async def adapter_error(_request, exc: AdapterRequestError):
        return JSONResponse(error_body(exc.message, "invalid_request_error", exc.param, exc.code),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        # FastAPI's locations start with where the value came from ("path", "query", "body").
        errors = [{**e, "loc": tuple(e["loc"])[1:]} for e in exc.errors()]
        param, message = validation_error(errors)
        return JSONResponse(error_body(message, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        # A word for a code, as OpenAI's are ("not_found", "method_not_allowed"), not "404".
        try:
            code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            code = None
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        return JSONResponse(error_body(message, code=code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    # -- shared request handling -----------------------------------------------------

    def resolve_model(name: str) -> str | None:
        if name == registry.base_name:
            return None
        if name in registry:
            return name
        raise APIError(404, f"model '{name}' does not exist; GET /v1/models lists the base and "
                            "its adapters", param="model", code="model_not_found")

    def sampling(req, prompt_len: int) -> SamplingParams:
        context = backend.context_length
        if prompt_len >= context:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context is {context}",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        room = context - prompt_len
        budget = req.token_budget()
        if budget is None:
            budget = min(req.default_max_tokens or room, room)
        elif budget > room:
            raise APIError(400, f"max_tokens {budget} + prompt {prompt_len} tokens exceeds the "
                                f"context of {context}", param="max_tokens",
                           code="context_length_exceeded")
        return SamplingParams(max_new_tokens=budget, temperature=req.temperature, top_p=req.top_p,
                              stop=tuple(req.stop_list()), seed=req.seed)

    def check_options(req) -> None:
        name = req.unsupported_option()
        if name is not None:
            raise APIError(400, f"'{name}' is not supported by this server", param=name,
                           code="unsupported_parameter")

    def submit(prompts: list[list[int]], req):
        adapter = resolve_model(req.model)
        requests = []
        for prompt in prompts:
            params = sampling(req, len(prompt))
            for _ in range(req.n):
                # Row k of the whole request (prompt p's choice i is row p * n + i), as
                # `graft generate` seeds its prompts: two prompts share no random stream.
                row = len(requests)
                seeded = params if params.seed is None else replace(params, seed=row_seed(params.seed, row))
                requests.append(EngineRequest(prompt, seeded, adapter=adapter))
        if len(requests) > scheduler.max_queue:
            raise APIError(400, f"the request asks for {len(requests)} sequences; the server "
                                f"queues at most {scheduler.max_queue}", param="n")
        try:
            return scheduler.submit(requests)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", type_="rate_limit_error")

    async def collect(request: Request, submission, count: int):
        texts, tokens, reasons = [""] * count, [0] * count, [None] * count
        watcher = asyncio.create_task(_wait_for_disconnect(request, submission.cancel))
        try:
            async for event in submission.events():
                if event.error is not None:
                    raise APIError(500, f"generation failed: {event.error}", type_="server_error")
                out = event.output
                texts[event.choice] += out.text
                tokens[event.choice] += 1
                reasons[event.choice] = out.finish_reason or reasons[event.choice]
        finally:
            watcher.cancel()
            submission.cancel()
        return texts, tokens, reasons

    def stream(request: Request, submission, chunk, final_chunks, include_usage, prompt_tokens):
        async def body():
            watcher = asyncio.create_task(_wait_for_disconnect(request, submission.cancel))
            completion_tokens = 0
            try:
                for first in final_chunks("start"):
                    yield _sse(first)
                async for event in submission.events():
                    if event.error is not None:
                        yield _sse(error_body(f"generation failed: {event.error}", "server_error"))
                        break
                    out = event.output
                    completion_tokens += 1
                    if out.text or out.finish_reason:
                        yield _sse(chunk(event.choice, out.text, out.finish_reason))
                if include_usage:
                    yield _sse(final_chunks("usage", usage(prompt_tokens, completion_tokens)))
                yield b"data: [DONE]\n\n"
            finally:
                watcher.cancel()
                submission.cancel()
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # -- routes ----------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "base_quantization": backend.base_quantization, **scheduler.stats()}

    def base_model() -> dict:
        return {"id": registry.base_name, "object": "model", "created": backend.created,
                "owned_by": "graftlm", "root": registry.base_name, "parent": None,
                "quantization": backend.base_quantization}

    def adapter_model(entry) -> dict:
        return {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "graftlm",
                "root": str(entry.name), "parent": registry.base_name}

    @app.get("/v1/models")
    async def list_models():
        data = [base_model()] + [adapter_model(e) for e in registry.entries()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str):
        if name == registry.base_name:
            return base_model()
        for entry in registry.entries():
            if entry.name == name:
                return adapter_model(entry)
        raise APIError(404, f"model '{name}' does not exist; GET /v1/models lists the base and "
                            "its adapters", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        check_options(req)
        tok = backend.tokenizer
        if isinstance(req.prompt, str):
            prompts = [backend.encode_prompt(req.prompt)]
        elif req.prompt and isinstance(req.prompt[0], int):
            if max(req.prompt) >= tok.vocab_size:
                raise APIError(400, f"prompt token ids must be below {tok.vocab_size}", param="prompt")
            prompts = [list(req.prompt)]
        else:
            prompts = [backend.encode_prompt(p) for p in req.prompt]
        if any(not p for p in prompts):
            raise APIError(400, "the prompt is empty (and the tokenizer has no BOS token)", param="prompt")
        submission = submit(prompts, req)
        rid, created, count = f"cmpl-{uuid.uuid4().hex}", _now(), len(prompts) * req.n
        prompt_tokens = sum(len(p) for p in prompts)

        if req.stream:
            def chunk(i, text, reason):
                return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}]}

            def extra(kind, use=None):
                if kind == "usage":
                    return {"id": rid, "object": "text_completion", "created": created,
                            "model": req.model, "choices": [], "usage": use}
                return []
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(request, submission, chunk, extra, include, prompt_tokens)

        texts, tokens, reasons = await collect(request, submission, count)
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": i, "text": texts[i], "finish_reason": reasons[i], "logprobs": None}
                            for i in range(count)],
                "usage": usage(prompt_tokens, sum(tokens))}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        check_options(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except TemplateError as e:
            raise APIError(400, f"messages: the chat template refused them ({e})", param="messages")
        prompt = backend.encode_prompt(text)
        submission = submit([prompt], req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()

        def chunk_of(choices, use=None):
            out = {"id": rid, "object": "chat.completion.chunk", "created": created,
                   "model": req.model, "choices": choices}
            if use is not None:
                out["usage"] = use
            return out

        if req.stream:
            def chunk(i, text, reason):
                delta = {"content": text} if text else {}
                return chunk_of([{"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}])

            def extra(kind, use=None):
                if kind == "usage":
                    return chunk_of([], use)
                return [chunk_of([{"index": i, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None, "logprobs": None}]) for i in range(req.n)]
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(request, submission, chunk, extra, include, len(prompt))

        texts, tokens, reasons = await collect(request, submission, req.n)
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                             "finish_reason": reasons[i], "logprobs": None} for i in range(req.n)],
                "usage": usage(len(prompt), sum(tokens))}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        req = await _parse(request, LoadAdapterRequest)
        name = check_adapter_name(req.name)
        if name == registry.base_name or name in registry:
            raise APIError(409, f"a model named '{name}' is already loaded", param="name",
                           code="adapter_exists")
        entry = await backend.load_adapter(name, req.path)
        return {"id": entry.name, "object": "model", "created": entry.created,
                "owned_by": "graftlm", "parent": registry.base_name}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        if name == registry.base_name:
            raise APIError(400, "the base model cannot be unloaded", param="name", code="base_model")
        check_adapter_name(name)
        if name not in registry:
            raise APIError(404, f"adapter '{name}' is not loaded", param="name", code="adapter_not_found")
        await backend.unload_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app
