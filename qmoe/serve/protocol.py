"""The OpenAI API's request bodies, checked, and the objects sent back.

`parse_completion` and `parse_chat` turn a decoded JSON body into a
GenerationRequest or raise APIError, which the app answers with OpenAI's error
object, {"error": {"message", "type", "param", "code"}}, and a 4xx status.
Fields the server does not use (user, logit_bias, ...) are ignored, as
llama-server does, so that clients which send them keep working; a field it
uses with a value of the wrong type or out of range is refused, naming it.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from qmoe.engine import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI allows
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Defaults:
    """What a request that leaves a field out gets: `qmoe serve`'s sampling flags."""

    max_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationRequest:
    """One checked request: the prompt (text or token ids), limits and sampling."""

    prompt: str | list[int]
    max_tokens: int | None  # None: the default, cut to what the context leaves
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    chat: bool


# ----------------------------------------------------------------------------- field checks


def _bad(param: str, expected: str, value: Any) -> APIError:
    return APIError(400, f"'{param}' must be {expected}, got {value!r:.80}", param=param)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, "a number", value)
    if value < low or value > high or (low_open and value == low):
        raise _bad(name, f"in {'(' if low_open else '['}{low}, {high}]", value)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "an integer", value)
    if not low <= value <= high:
        raise _bad(name, f"an integer in [{low}, {high}]", value)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, "true or false", value)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "a string or a list of strings", stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} strings", stop)
    return [s for s in stop if s]


def _common(body: dict, defaults: Defaults, n_ctx: int, max_tokens_names: tuple[str, ...]) -> dict:
    _integer(body, "n", 1, 1)  # one choice per request
    given = [name for name in max_tokens_names if body.get(name) is not None]
    max_tokens = _integer(body, given[0], 1, n_ctx) if given else None
    d = defaults.sampling
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed", "an integer", seed)
    top_k = _integer(body, "top_k", 0, 1 << 30)  # llama-server's extensions, for clients that send them
    sampling = SamplingParams(
        temperature=_number(body, "temperature", d.temperature, 0.0, 2.0),
        top_k=d.top_k if top_k is None else top_k,
        top_p=_number(body, "top_p", d.top_p, 0.0, 1.0, low_open=True),
        seed=d.seed if seed is None else seed % 2**32,  # any integer, as OpenAI takes; numpy wants >= 0
        repeat_penalty=_number(body, "repeat_penalty", d.repeat_penalty, 0.0, 100.0, low_open=True),
        repeat_last_n=d.repeat_last_n,
    )
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "an object", options)
    include_usage = _flag(options or {}, "include_usage")
    return dict(max_tokens=max_tokens, sampling=sampling, stop=_stop(body), stream=stream,
                include_usage=include_usage)


def check_model(body: dict, model_id: str) -> None:
    """`model` may be left out; when given it must name the model this server runs."""
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise _bad("model", "a string", name)
    if name != model_id:
        raise APIError(404, f"The model '{name:.80}' does not exist; this server runs '{model_id}'",
                       param="model", code="model_not_found")


def parse_completion(body: dict, defaults: Defaults, n_ctx: int, n_vocab: int) -> GenerationRequest:
    """/v1/completions: `prompt` is a string, or token ids, or a list holding one of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab
                                 for t in prompt):
            raise _bad("prompt", f"a string or a non-empty list of token ids in [0, {n_vocab})", prompt)
    elif not isinstance(prompt, str):
        raise _bad("prompt", "a string (one prompt per request) or a list of token ids", prompt)
    return GenerationRequest(prompt=prompt, chat=False, **_common(body, defaults, n_ctx, ("max_tokens",)))


def parse_chat(body: dict, defaults: Defaults, n_ctx: int) -> tuple[GenerationRequest, list[dict]]:
    """/v1/chat/completions: the request and its messages as the chat template takes them
    ({"role", "content": str}; a content list's text parts are joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of messages", messages)
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}]", f"an object with a 'role' among {', '.join(ROLES)}", m)
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content", "a string or a list of text parts", content)
            content = "".join(p["text"] for p in content)
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "a string or a list of text parts", content)
        plain.append({"role": m["role"], "content": content})
    request = GenerationRequest(prompt="", chat=True,
                                **_common(body, defaults, n_ctx, ("max_tokens", "max_completion_tokens")))
    return request, plain


# ----------------------------------------------------------------------------- responses


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV the slot already held (the prompt cache)

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class Reply:
    """The response objects of one request, plain and streamed, in OpenAI's shapes."""

    def __init__(self, model_id: str, chat: bool):
        self.chat, self.model_id = chat, model_id
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, usage: Usage | None) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "choices": choices, "usage": usage.body() if usage is not None else None}

    def whole(self, text: str, finish_reason: str, usage: Usage) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], usage)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage)

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed piece; `first` (chat) also names the role, `finish_reason` ends the choice."""
        if self.chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice], None)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], None)

    def usage_chunk(self, usage: Usage) -> dict:
        """stream_options.include_usage: the last chunk, no choices, the usage."""
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage)
