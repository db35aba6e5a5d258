"""The OpenAI chat-completions wire format: requests as pydantic models, responses and errors as dicts
built in one place each."""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # tools, logprobs...: accepted and ignored, as llama-server does

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class RequestError(Exception):
    """A request the server answers with an OpenAI-shaped error and ``status``."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


TOO_DEEP = f"the body's JSON is nested too deeply to parse (Python's parser stops near {sys.getrecursionlimit()} levels)"


def decode_json(body: bytes) -> Any:
    """The body's JSON, or a 400: not JSON, or nested deeper than Python's parser recurses."""
    try:
        return json.loads(body)
    except RecursionError as e:
        raise RequestError(400, TOO_DEEP) from e
    except ValueError as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from e


def parse_request(data: Any) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(data)
    except RecursionError as e:
        raise RequestError(400, TOO_DEEP) from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise RequestError(400, f"{where}: {first['msg']}", param=where or None) from e


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """``prompt_tokens`` counts every position the prompt fills, image positions included; ``cached_tokens``
    those that came from the KV cache (this conversation's or the prompt cache on disk)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(cid: str, model: str, text: str, finish_reason: str, usage_: dict[str, Any],
               timings_: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "finish_reason": finish_reason, "logprobs": None}],
                           "usage": usage_}
    if timings_ is not None:
        out["timings"] = timings_
    return out


def timings(*, queued_s: float, first_token_s: float, image_s: float, prompt_s: float, prompt_n: int,
            cached_n: int, predicted_s: float, predicted_n: int) -> dict[str, Any]:
    """Where the request's time went, as llama-server's ``timings`` (milliseconds; ``prompt_n`` the positions
    decoded, ``cached_n`` those reused), with ours: ``queued_ms`` waiting for a sequence, ``first_token_ms``
    from arrival to the first token (queue, images and prefill), ``image_ms`` getting the images' features."""
    return {"queued_ms": 1e3 * queued_s, "first_token_ms": 1e3 * first_token_s, "image_ms": 1e3 * image_s,
            "prompt_n": prompt_n, "cache_n": cached_n, "prompt_ms": 1e3 * prompt_s,
            "prompt_per_second": prompt_n / prompt_s if prompt_s > 0 else 0.0,
            "predicted_n": predicted_n, "predicted_ms": 1e3 * predicted_s,
            "predicted_per_second": predicted_n / predicted_s if predicted_s > 0 else 0.0}


def chunk(cid: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
          usage_: dict[str, Any] | None = None, timings_: dict[str, Any] | None = None) -> dict[str, Any]:
    """One server-sent event's payload; ``delta=None`` gives the usage-only chunk (no choices); the last
    chunk with choices carries ``timings``."""
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                           "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish_reason, "logprobs": None}]}
    if usage_ is not None:
        out["usage"] = usage_
    if timings_ is not None:
        out["timings"] = timings_
    return out


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "llava-gguf"}]}
