"""The OpenAI wire format: request bodies checked field by field, and response / stream chunk bodies.

Every bad field is an `ApiError` (400) that names the field and says what is accepted, in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from .sampling import SamplingParams

MAX_STOP = 4


class ApiError(Exception):
    """An error answered as JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error",
                429: "rate_limit_error"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens: int = 512  # per request
    max_context: int = 8192  # prompt + completion


@dataclass
class Completion:
    """A parsed request: which model, the prompt (chat messages or text), sampling and streaming options."""

    model: str
    chat: bool
    prompt: list[dict] | str
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse(body: object, chat: bool, limits: Limits) -> Completion:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the base model's name or an adapter's name (see /v1/models)",
                       "model")
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise ApiError(400, f"'{name}' must be 1 (one completion per request)", name)
    for name in ("logprobs", "echo", "suffix", "tools", "functions", "top_logprobs"):
        if body.get(name) not in (None, False, [], 0):
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    prompt = _messages(body.get("messages")) if chat else _prompt(body.get("prompt"))
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return Completion(model, chat, prompt, sampling(body, limits), stream, bool(options.get("include_usage")))


def sampling(body: dict, limits: Limits) -> SamplingParams:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, int, 1, limits.max_tokens, limits.max_tokens)
    temperature = _number(body, "temperature", float, 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be > 0", "top_p")
    seed = _number(body, "seed", int, -(2**63), 2**63 - 1, None)
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=_stop(body.get("stop")),
                          seed=seed)


def _number(body: dict, name: str, kind: type, low, high, default):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        raise ApiError(400, f"'{name}' must be {what} in [{low}, {high}], got {value!r}", name)
    return kind(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise ApiError(400, f"'{name}' must be true or false", name)
    return bool(value)


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(stops)


def _prompt(value) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise ApiError(400, "'prompt' must be a string (or a list holding one string)", "prompt")
    return value


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] needs a role of system, developer, user or assistant", "messages")
        out.append({"role": "system" if message["role"] == "developer" else message["role"],
                    "content": _content(message.get("content"), i)})
    return out


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


# ---- responses ----------------------------------------------------------------------------------------------------
class Reply:
    """Builds the response body or the stream chunks of one completion."""

    def __init__(self, request: Completion) -> None:
        self.request = request
        prefix = "chatcmpl" if request.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.request.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def full(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.request.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
            return self._envelope("chat.completion", [choice], usage)
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self._envelope("text_completion", [choice], usage)

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.request.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": 0, "text": text, "finish_reason": finish_reason,
                                                   "logprobs": None}])

    def usage_chunk(self, usage: dict) -> dict:
        kind = "chat.completion.chunk" if self.request.chat else "text_completion"
        return self._envelope(kind, [], usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
