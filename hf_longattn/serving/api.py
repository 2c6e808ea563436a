"""The HTTP API, OpenAI-style: what the `openai` client, curl and most OpenAI-compatible tools speak.

    POST /v1/completions        {"prompt": "..." or [token ids], "max_tokens": 16, "stream": false, ...}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], ...}: the model's chat template
    GET  /v1/models             the served model, its attention method and the method's options
    GET  /health                status, queue length, devices

`stream: true` answers with server-sent events (`data: {chunk}` lines, then `data: [DONE]`). Every answer carries
`timing` (queue wait, time to first token, prefill and decode tokens/s) beside `usage`. Bad input gets a 4xx with an
OpenAI-style `{"error": {"message", "type", "param", "code"}}` and generates nothing. Extensions beyond OpenAI's
fields: `ignore_eos` (generate exactly max_tokens, for benchmarks).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine import BadRequest, Engine, Generation, Sampling


class _Strict(BaseModel):
    # Unknown fields and values of the wrong type are errors, not silently ignored or coerced ("16" is not 16).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampled(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError(f"n={n}: this server returns one choice per request; send n requests instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 stop strings, none of them empty")
        return stops

    def sampling(self, max_new_tokens: int) -> Sampling:
        return Sampling(max_new_tokens, self.temperature, self.top_p, self.stop or [], self.seed, self.ignore_eos)


class CompletionRequest(_Sampled):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Sampled):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def create_app(engine: Engine, model_info: dict | None = None) -> FastAPI:
    """The app serving `engine`; `model_info` adds fields to /v1/models (the method and its options)."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="hf-longattn", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(BadRequest)
    async def bad_request(request, error: BadRequest):
        return _error(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        return _error(400, *_describe(error.errors()[0]))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "queued": engine.queued, "busy": engine.busy,
                "served": engine.finished, "cancelled": engine.cancelled, **(model_info or {})}

    @app.get("/v1/models")
    async def models():
        card = {"id": engine.name, "object": "model", "created": created, "owned_by": "hf_longattn",
                "max_context": engine.max_context, "vocab_size": len(engine.tokenizer), **(model_info or {})}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(engine, body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise BadRequest("send one prompt per request (a list of strings asks for a batch)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = engine.encode_text(prompt)
        else:
            engine.check_token_ids(prompt)
            ids = prompt
        request_id = _new_id("cmpl")
        generation = engine.submit(ids, body.sampling(engine.max_new_tokens(len(ids), body.max_tokens)),
                                   f"completion {request_id}")
        return await _answer(request, body, generation, request_id, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(engine, body.model)
        ids = engine.encode_chat([m.as_template_input() for m in body.messages])
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request_id = _new_id("chatcmpl")
        generation = engine.submit(ids, body.sampling(engine.max_new_tokens(len(ids), requested)), f"chat {request_id}")
        return await _answer(request, body, generation, request_id, chat=True)

    async def _answer(request: Request, body: _Sampled, generation: Generation, request_id: str, chat: bool):
        head = {"id": request_id, "created": int(time.time()), "model": engine.name,
                "system_fingerprint": (model_info or {}).get("method")}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(generation, head, chat, include_usage), media_type="text/event-stream")
        watcher = asyncio.create_task(_cancel_when_gone(request, generation))
        try:
            text = "".join([delta async for delta in generation.text_deltas()])
        except Exception as error:
            return _error(500, f"generation failed: {error!r}", None, type_="server_error")
        finally:
            watcher.cancel()
        choice = {"index": 0, "finish_reason": generation.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": generation.usage(), "timing": generation.timing()}

    return app


async def _events(generation: Generation, head: dict, chat: bool, include_usage: bool):
    """Server-sent events; if the client goes away, Starlette cancels this generator and the generation stops."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish_reason=None, **extra) -> str:
        if chat:
            choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
        return _sse({**head, "object": kind, "choices": [choice], **extra})

    try:
        if chat:
            yield _sse({**head, "object": kind, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                            "finish_reason": None}]})
        async for delta in generation.text_deltas():
            yield chunk(delta)
        yield chunk(None, generation.finish_reason, timing=generation.timing())
        if include_usage:
            yield _sse({**head, "object": kind, "choices": [], "usage": generation.usage()})
    except Exception as error:  # the status line is already sent: report in the stream, as OpenAI does
        yield _sse({"error": {"message": f"generation failed: {error!r}", "type": "server_error"}})
    finally:
        if generation.finished_at is None:  # cancelled by Starlette: the client is gone
            generation.cancel()
    yield "data: [DONE]\n\n"


async def _cancel_when_gone(request: Request, generation: Generation) -> None:
    """For a plain (not streamed) answer: wait for the client's disconnect message, then stop its generation."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


def _check_model(engine: Engine, requested: str | None) -> None:
    if requested is not None and requested != engine.name:
        raise BadRequest(f"model '{requested}' is not served here; this server serves '{engine.name}' "
                         "(GET /v1/models)", "model", status=404, code="model_not_found")


def _describe(error: dict) -> tuple[str, str | None]:
    """(message, param) for the first thing pydantic or the JSON parser found wrong."""
    kind, path = error["type"], [str(p) for p in error["loc"][1:]]
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}", None
    if not path:
        return "the request body must be a JSON object (Content-Type: application/json)", None
    where = ".".join(path)
    if kind == "extra_forbidden":
        return f"unknown field '{where}': this server does not support it", where
    if kind == "missing":
        return f"field '{where}' is required", where
    return f"field '{where}': {error['msg'].removeprefix('Value error, ')}", where


def _error(status: int, message: str, param: str | None, code: str | None = None, type_: str = "invalid_request_error"):
    error = {"message": message, "type": type_, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"
