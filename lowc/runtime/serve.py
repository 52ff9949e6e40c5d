"""An OpenAI-compatible HTTP API over the generation engine (FastAPI; run it with uvicorn, see serve_command.py).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (when the model's tokenizer has a chat template),
`GET /v1/models`, `GET /health`. Streaming answers are Server-Sent Events (`data: {json}\\n\\n` chunks, then
`data: [DONE]`). Every error is a JSON body in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`:
malformed or out-of-range requests get 400, over the concurrency limit 429, while shutting down 503, and an
unexpected failure 500 — the server itself never goes down on a request.

The engine runs in its own thread; each request is an engine handle read with `async for` on the event loop, so
all concurrent requests are decoded together (continuous batching). A client that disconnects cancels its request.
On shutdown the engine stops taking requests, lets running ones finish for `shutdown_grace_s` seconds and then
ends them with finish_reason "abort", so every open stream still gets its last chunk and `[DONE]`.
"""

# no `from __future__ import annotations` here: FastAPI reads the request-model annotations of the routes,
# which are local classes, at definition time
import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UsageError
from .chat import ChatTemplate, ChatTemplateError, load_chat_template
from .engine import Engine, EngineClosed, RequestHandle, SamplingParams

_AUTO = object()


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError:
        raise UsageError("lowc serve needs FastAPI and uvicorn: pip install 'lowc[serve]' "
                         "(or pip install fastapi uvicorn)") from None


@dataclass
class ServeLimits:
    """Per-request and server-wide limits; requests beyond them get a 4xx answer, never a queue without end.

    max_tokens: largest `max_tokens` a request may ask for (also the default for chat completions);
    max_prompt_tokens: longest prompt (default: the engine's max_seq_len - 1); max_concurrent: requests in flight
    (running or queued in the engine) before new ones get 429; shutdown_grace_s: how long running requests may
    go on once shutdown starts.
    """

    max_tokens: int = 1024
    max_prompt_tokens: int | None = None
    max_concurrent: int = 64
    shutdown_grace_s: float = 5.0

    def validate(self) -> None:
        for name in ("max_tokens", "max_concurrent"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise UsageError(f"--max-prompt-tokens: expected a positive number, got {self.max_prompt_tokens}")


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status plus {"error": {...}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _models():
    """Request bodies as pydantic models (built lazily so importing this module needs no pydantic)."""
    from pydantic import BaseModel, ConfigDict, Field

    class _Common(BaseModel):
        model_config = ConfigDict(extra="ignore")  # unknown fields are tolerated, as OpenAI clients send many

        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        n: int = Field(1, ge=1)
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        stop: str | list[str] | None = None
        seed: int | None = None
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        logit_bias: dict[str, float] | None = None
        ignore_eos: bool = False  # vLLM's extension, handy for benchmarks

    class CompletionRequest(_Common):
        prompt: str | list[str] | list[int] | list[list[int]]
        echo: bool = False
        logprobs: int | None = None
        best_of: int | None = None
        suffix: str | None = None

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="allow")

        role: Literal["system", "user", "assistant", "tool", "developer"]
        content: str | list[dict[str, Any]] | None = None

    class ChatRequest(_Common):
        messages: list[ChatMessage] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool | None = None

    return CompletionRequest, ChatRequest


def _unsupported(req, names: dict[str, Any]) -> None:
    """400 for OpenAI options this server does not implement, when set to anything but their neutral value."""
    for name, neutral in names.items():
        value = getattr(req, name, neutral)
        if value not in (neutral, None) and not (isinstance(value, (dict, list)) and not value):
            raise APIError(400, f"'{name}' is not supported by lowc serve (got {value!r})", param=name,
                           code="unsupported_parameter")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "'stop': up to 4 non-empty strings", param="stop")
    return stops


def _chunk_sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _Server:
    """The state behind the routes: the engine, the limits, the chat template and the requests in flight."""

    def __init__(self, engine: Engine, model_name: str, limits: ServeLimits, chat_template: ChatTemplate | None):
        self.engine, self.model_name, self.limits, self.chat = engine, model_name, limits, chat_template
        self.inflight: set[RequestHandle] = set()
        self.created = int(time.time())
        self.draining = False
        limit = engine.max_seq_len - 1
        self.max_prompt = min(limits.max_prompt_tokens or limit, limit)

    # ---- request preparation
    def check_capacity(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", kind="server_error", code="shutting_down")
        self.inflight = {h for h in self.inflight if not h.done}
        if len(self.inflight) >= self.limits.max_concurrent:
            raise APIError(429, f"too many requests in flight (limit {self.limits.max_concurrent}); retry later",
                           kind="rate_limit_error", code="max_concurrent")

    def tokenize_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            raise APIError(400, "'prompt': one prompt per request (send several requests; they are batched)",
                           param="prompt")
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as a list of token ids",
                               param="prompt")
            ids = self.engine.tokenizer.encode_prompt(prompt)
        else:
            ids = list(prompt)
            vocab = self.engine.config.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise APIError(400, f"'prompt': token ids must be in [0, {vocab})", param="prompt")
        if not ids:
            raise APIError(400, "'prompt' is empty after tokenization", param="prompt")
        return ids

    def sampling(self, req, prompt_len: int, requested: int | None, default: int) -> SamplingParams:
        if prompt_len > self.max_prompt:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server takes at most "
                                f"{self.max_prompt}", param="prompt", code="context_length_exceeded")
        room = self.engine.max_seq_len - prompt_len
        if requested is not None:
            if requested > self.limits.max_tokens:
                raise APIError(400, f"'max_tokens' is {requested}; this server allows at most "
                                    f"{self.limits.max_tokens}", param="max_tokens")
            if requested > room:
                raise APIError(400, f"the model's context is {self.engine.max_seq_len} tokens: {prompt_len} prompt "
                                    f"tokens leave room for {room}, {requested} were asked for",
                               param="max_tokens", code="context_length_exceeded")
            max_tokens = requested
        else:
            max_tokens = max(1, min(default, self.limits.max_tokens, room))
        _unsupported(req, {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None})
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                              stop=_stop_list(req.stop), ignore_eos=req.ignore_eos)

    def submit(self, ids: list[int], params: SamplingParams) -> RequestHandle:
        self.check_capacity()
        try:
            handle = self.engine.submit(ids, params, loop=asyncio.get_running_loop())
        except EngineClosed:
            raise APIError(503, "the server is shutting down", kind="server_error", code="shutting_down") from None
        except UsageError as e:
            raise APIError(400, str(e)) from None
        self.inflight.add(handle)
        return handle

    # ---- responses
    def usage(self, handle: RequestHandle) -> dict:
        p, c = len(handle.prompt_ids), len(handle.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def chunk(self, rid: str, created: int, chat: bool, text: str | None, finish: str | None,
              role: bool = False) -> dict:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({} if text is None else
                                                                                     {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [choice]}

    async def stream(self, handle: RequestHandle, rid: str, created: int, chat: bool, include_usage: bool):
        """SSE chunks for one request; a disconnect (generator closed early) cancels it in the engine."""
        try:
            if chat:
                yield _chunk_sse(self.chunk(rid, created, True, None, None, role=True))
            async for delta in handle:
                if delta.finish_reason == "error":
                    err = APIError(500, f"generation failed: {delta.error}", kind="server_error")
                    yield _chunk_sse(err.body())
                    break
                if delta.text or delta.finish_reason is not None:
                    yield _chunk_sse(self.chunk(rid, created, chat, delta.text or ("" if not chat else None),
                                                delta.finish_reason))
            if include_usage:
                usage = {**self.chunk(rid, created, chat, None, None), "choices": [], "usage": self.usage(handle)}
                yield _chunk_sse(usage)
            yield _chunk_sse("[DONE]")
        finally:
            if not handle.done:
                handle.cancel()

    async def complete(self, handle: RequestHandle, rid: str, created: int, chat: bool) -> dict:
        """The whole answer as one JSON object (the request is cancelled if the client goes away meanwhile)."""
        try:
            async for _ in handle:
                pass
        finally:
            if not handle.done:
                handle.cancel()
        if handle.finish_reason == "error":
            raise APIError(500, f"generation failed: {handle.error}", kind="server_error")
        usage = self.usage(handle)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": handle.text}, "logprobs": None,
                      "finish_reason": handle.finish_reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": handle.text, "logprobs": None, "finish_reason": handle.finish_reason}
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [choice], "usage": usage}

    async def answer(self, handle: RequestHandle, req, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self.stream(handle, rid, created, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await self.complete(handle, rid, created, chat))


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line from pydantic's error list: 'field: problem' (the first error; the count of the others)."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        msg = "this field is required"
    elif first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    elif not param:
        return "the request body must be a JSON object", None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"'{param}': {msg}{more}" if param else f"{msg}{more}"), param


def create_app(engine: Engine, model_name: str, limits: ServeLimits | None = None, chat_template=_AUTO):
    """The FastAPI app serving `engine` as model `model_name` within `limits`.

    chat_template: a ChatTemplate, None (no chat endpoint: it answers 501), or by default the template found in
    the model's directory (tokenizer_config.json `chat_template` or chat_template.jinja). The app starts the
    engine's thread on startup (and on the first request, for ASGI transports without lifespan events) and shuts
    it down, gracefully, on shutdown.
    """
    _require_fastapi()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or ServeLimits()
    limits.validate()
    if chat_template is _AUTO:
        chat_template = load_chat_template(getattr(engine.model, "lowc_path", None))
    state = _Server(engine, model_name, limits, chat_template)
    CompletionRequest, ChatRequest = _models()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            state.draining = True
            await asyncio.to_thread(engine.shutdown, limits.shutdown_grace_s)

    app = FastAPI(title="lowc", version="1", lifespan=lifespan)
    app.state.lowc = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind=kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", kind="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        ok = not state.draining and (engine.running or not engine.has_work())
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "active": engine.num_active,
                "waiting": engine.num_waiting, "draining": state.draining}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": state.created,
                                            "owned_by": "lowc", "max_model_len": engine.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):  # type: ignore[valid-type]
        engine.start()
        _unsupported(req, {"echo": False, "logprobs": None, "best_of": 1, "suffix": None})
        ids = state.tokenize_prompt(req.prompt)
        params = state.sampling(req, len(ids), req.max_tokens, default=16)
        return await state.answer(state.submit(ids, params), req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):  # type: ignore[valid-type]
        engine.start()
        if state.chat is None:
            raise APIError(501, f"model '{model_name}' has no chat template (tokenizer_config.json has no "
                                "'chat_template'); use /v1/completions", code="no_chat_template")
        if engine.tokenizer is None:
            raise APIError(501, "this model has no tokenizer.json", code="no_tokenizer")
        _unsupported(req, {"logprobs": False})
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):  # [{"type": "text", "text": "..."}]
                if any(p.get("type") != "text" for p in content):
                    raise APIError(400, "'messages': only text content parts are supported", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            messages.append({**m.model_dump(exclude_none=True), "content": content or ""})
        try:
            text = state.chat.render(messages)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = engine.tokenizer.encode(text)
        if not ids:
            raise APIError(400, "'messages' give an empty prompt", param="messages")
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = state.sampling(req, len(ids), requested, default=limits.max_tokens)
        return await state.answer(state.submit(ids, params), req, chat=True)

    def begin_shutdown() -> None:
        """Stop taking requests and let running ones finish within the grace period (non-blocking)."""
        state.draining = True
        engine.drain(limits.shutdown_grace_s)

    app.state.begin_shutdown = begin_shutdown
    return app
