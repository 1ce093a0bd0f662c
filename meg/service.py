"""The HTTP service of an edited model (`meg serve`): FastAPI on uvicorn, micro-batched answers.

Endpoints
  GET  /health                status, the model served, queue and batching counters (503 when the batching
                              worker is dead; only {"status"} without the API key when one is set)
  GET  /metrics               Prometheus text format: requests by endpoint and status, latency histogram,
                              queue depth, questions answered and routed, tokens
  POST /v1/answer             {"questions": [str, ...], "explain": false} -> {"answers": [str, ...]}
                              (+ "explanations" when explain is true)
  GET  /v1/models             OpenAI-compatible: the one model served
  POST /v1/chat/completions   OpenAI-compatible chat: the messages through the model's chat template, routed on
                              the last user message; streaming as server-sent events
  POST /v1/completions        OpenAI-compatible raw completion of one or more prompts
  GET  /openapi.json          the OpenAPI 3 schema of the above

Every endpoint answers through the same path: concurrent requests are gathered by ``meg.batcher.Batcher``
and answered in ONE batched pass with per-question neuron weights (``meg.answer.answer_detail``), so
answers do not depend on what else was in the batch (up to floating-point rounding of batched products).
Requests of different kinds (chat turns, raw completions) are gathered in separate passes. Answers are
greedy: OpenAI requests with ``temperature`` > 0 are refused (422), since sampling would make an edited
fact's answer a matter of chance.

Each request fails alone. Texts are checked before anything is queued (valid Unicode, no control
characters other than newline and tab: 422 naming the field; length in tokens of the model's input,
``max_tokens_per_question``: 413). A batched pass that fails is run again one request at a time, so only
the request that cannot be answered gets a 500; a 500 says "internal error" with the request id, and the
details go to the log.

Errors on /v1/answer and /health are JSON ``{"error": {"status": N, "message": "...", "problems": [...]}}``;
on the OpenAI endpoints they take OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
  400 the body is empty or not JSON;
  401 an API key is set and the request does not carry it (``Authorization: Bearer KEY``);
  404 unknown path, or (OpenAI) a model other than the one served;
  413 the body, the number of questions or a question is larger than the configured limits;
  422 the JSON has the wrong shape or a value is refused: not an object, unknown field (/v1/answer), texts
      blank, not valid Unicode or holding control characters, unsupported OpenAI options (n != 1,
      temperature > 0, tools, ...);
  503 the queue is full (``Retry-After`` says when to retry) or the batching worker is dead;
  500 the model failed on the request ("internal error", the request id; the log has the details).

Every response carries ``X-Request-ID`` (the client's own, when it sends a short plain one). Every request
writes one access-log line (logger ``meg.access``): request id, method, path, status, questions, prompt and
completion tokens, latency in ms.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import unicodedata
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.requests import Request

from meg.batcher import BatchConfig, Batcher, QueueFull
from meg.errors import ConfigError

API_VERSION = "1"

log = logging.getLogger("meg.service")
access_log = logging.getLogger("meg.access")


@dataclass
class ServiceConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing the service is a deliberate choice
    port: int = 8000  # 0 = any free port (tests)
    max_questions: int = 32  # questions per request at most (413 beyond)
    max_chars: int = 2000  # characters per question at most (413 beyond)
    max_tokens_per_question: int = 1024  # tokens of the model's input per question at most (413 beyond)
    max_body_bytes: int = 1 << 20  # request body bytes at most (413 beyond), checked before parsing
    max_batch_size: int = 32  # questions per batched pass
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # questions waiting at most (503 beyond)
    max_new_tokens: int | None = None  # tokens generated per answer at most (None: 40 in chat, 20 completing)
    max_completion_tokens: int = 512  # the largest max_tokens an OpenAI request may ask for (422 beyond)
    # ask every question as a user turn of the model's chat template (None: when it has one; False: complete raw text)
    chat: bool | None = None
    sample_steps: int | None = None  # generator denoising steps (None: the bundle's); see meg.answer.AnswerConfig
    weight_cache: str = "off"  # "edit": generate weights once per edit and reuse them; see meg.answer.AnswerConfig
    threads: int | None = None  # torch CPU threads (None: torch's default)
    model_name: str = "meg"  # the model id of the OpenAI endpoints (GET /v1/models; requests must name it)
    # bearer token every request except the short /health must carry (None: no key; then the host must be loopback)
    api_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_questions", "max_chars", "max_tokens_per_question", "max_body_bytes", "max_new_tokens",
                     "max_completion_tokens"):
            value = getattr(self, name)
            if value is None and name == "max_new_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"service: bad value for '{name}': {value!r} (an integer >= 1)")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"service: bad value for 'port': {self.port!r} (0-65535)")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"service: bad value for 'threads': {self.threads!r} (an integer >= 1 or null)")
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ConfigError(f"service: bad value for 'model_name': {self.model_name!r} (a non-blank string)")
        if self.api_key is not None and (not isinstance(self.api_key, str) or len(self.api_key) < 8
                                         or not self.api_key.isprintable() or " " in self.api_key):
            raise ConfigError("service: bad value for 'api_key' (at least 8 printable characters, no spaces)")
        if self.api_key is None and not is_loopback(self.host):
            raise ConfigError(f"service: host {self.host!r} is not loopback: an API key is required "
                              f"(--api-key or MEG_API_KEY)")
        self.batch_config(), self.answer_config()  # both raise on bad settings
        if self.max_questions > self.max_batch_size:
            raise ConfigError(f"service: bad value for 'max_questions': {self.max_questions} (at most "
                              f"max_batch_size = {self.max_batch_size}: a request is answered in one pass)")

    def batch_config(self) -> BatchConfig:
        return BatchConfig(self.max_batch_size, self.max_wait_ms, self.max_queue)

    def answer_config(self):
        from meg.answer import AnswerConfig

        return AnswerConfig(max_new_tokens=self.max_new_tokens, sample_steps=self.sample_steps,
                            weight_cache=self.weight_cache, chat=self.chat)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiError(Exception):
    """A request refused with ``status``; ``param`` names the field at fault (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.problems = status, message, problems or []
        self.param, self.code = param, code


OPENAI_PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions")
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                 500: "server_error", 503: "server_error"}


def is_openai_path(path: str) -> bool:
    """The OpenAI-compatible endpoints (and unknown paths under /v1/ other than /v1/answer) answer errors in
    OpenAI's shape."""
    return path.startswith("/v1/") and not path.startswith("/v1/answer")


def _error_response(status: int, message: str, problems: list[str] | None = None, headers: dict | None = None,
                    openai: bool = False, param: str | None = None, code: str | None = None):
    from starlette.responses import JSONResponse

    if openai:
        text = message + (": " + "; ".join(problems) if problems else "")
        body = {"error": {"message": text, "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                          "param": param, "code": code}}
    else:
        body = {"error": {"status": status, "message": message, **({"problems": problems} if problems else {})}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413 before anything parses them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = _error_response(413, f"request body larger than {self.limit} bytes",
                                  openai=is_openai_path(scope.get("path", "")), code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ---- metrics

ENDPOINTS = ("/health", "/metrics", "/openapi.json", "/v1/answer", "/v1/models", "/v1/chat/completions",
             "/v1/completions")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def endpoint_label(path: str) -> str:
    """A request's endpoint as a metrics label (a bounded set: unknown paths are 'other')."""
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ENDPOINTS else "other"


class Metrics:
    """Counters of the service, written as Prometheus text exposition format (version 0.0.4)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}  # endpoint -> [count per bucket (cumulative at render), sum, count]
        self.questions = 0
        self.routed = 0
        self.tokens = {"prompt": 0, "completion": 0}

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            hist = self.latency.setdefault(endpoint, [[0] * len(LATENCY_BUCKETS), 0.0, 0])
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    hist[0][i] += 1
                    break
            hist[1] += seconds
            hist[2] += 1

    def observe_answers(self, n_questions: int, n_routed: int, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.questions += n_questions
            self.routed += n_routed
            self.tokens["prompt"] += prompt_tokens
            self.tokens["completion"] += completion_tokens

    def render(self, batcher: Batcher, max_queue: int) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

        with self._lock:
            requests = sorted(self.requests.items())
            latency = {k: ([*v[0]], v[1], v[2]) for k, v in sorted(self.latency.items())}
            questions, routed, tokens = self.questions, self.routed, dict(self.tokens)
        metric("meg_requests_total", "counter", "HTTP requests by endpoint and status.",
               [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in requests])
        hist_samples = []
        for endpoint, (counts, total, count) in latency.items():
            running = 0
            for bound, n in zip(LATENCY_BUCKETS, counts):
                running += n
                hist_samples.append((f'_bucket{{endpoint="{endpoint}",le="{bound:g}"}}', running))
            hist_samples.append((f'_bucket{{endpoint="{endpoint}",le="+Inf"}}', count))
            hist_samples.append((f'_sum{{endpoint="{endpoint}"}}', float(round(total, 6))))
            hist_samples.append((f'_count{{endpoint="{endpoint}"}}', count))
        lines.append("# HELP meg_request_duration_seconds Time from request to the end of the response.")
        lines.append("# TYPE meg_request_duration_seconds histogram")
        lines.extend(f"meg_request_duration_seconds{suffix} {value:g}" if isinstance(value, float)
                     else f"meg_request_duration_seconds{suffix} {value}" for suffix, value in hist_samples)
        metric("meg_queue_questions", "gauge", "Questions waiting for a batched pass.", [("", batcher.waiting)])
        metric("meg_queue_limit_questions", "gauge", "Questions that may wait at most (503 beyond).",
               [("", max_queue)])
        metric("meg_worker_up", "gauge", "1 while the batching worker runs.", [("", int(batcher.alive))])
        stats = batcher.stats
        metric("meg_batches_total", "counter", "Batched passes run.", [("", stats.batches)])
        metric("meg_batch_failures_total", "counter", "Passes of several requests that failed and were run again "
               "one request at a time.", [("", stats.failed_passes)])
        metric("meg_rejected_total", "counter", "Requests refused because the queue was full.", [("", stats.rejected)])
        metric("meg_questions_total", "counter", "Questions answered.", [("", questions)])
        metric("meg_questions_routed_total", "counter", "Questions the router sent to the edited knowledge.",
               [("", routed)])
        metric("meg_routed_share", "gauge", "Share of answered questions that were routed (0 before any).",
               [("", float(round(routed / questions, 6)) if questions else 0.0)])
        metric("meg_tokens_total", "counter", "Tokens read (prompt) and generated (completion).",
               [(f'{{kind="{k}"}}', v) for k, v in sorted(tokens.items())])
        return "\n".join(lines) + "\n"


# ---- request ids, the access log, the API key

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class Observe:
    """ASGI middleware around everything: a request id (``X-Request-ID``), the API key, one access-log line and
    the request metrics per request, and a generic 500 for anything that escapes the app."""

    def __init__(self, app, metrics: Metrics, api_key: str | None):
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        claimed = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = claimed if _CLIENT_ID.match(claimed) else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["authorized"] = self.api_key is None or _bearer_ok(headers.get(b"authorization", b""), self.api_key)
        path = scope.get("path", "")
        started, status = time.perf_counter(), [None]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            if not state["authorized"] and path != "/health":
                response = _error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                           openai=is_openai_path(path), code="invalid_api_key",
                                           headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as e:
            if status[0] is None:  # nothing was sent: the client gets a generic 500, the log the details
                log.error("request %s: %s %s failed: %s: %s", rid, scope.get("method"), path, type(e).__name__, e,
                          exc_info=e)
                response = _error_response(500, f"internal error (request id {rid})", openai=is_openai_path(path),
                                           code="internal_error")
                await response(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            code = status[0] or 500
            self.metrics.observe_request(endpoint_label(path), code, seconds)
            access_log.info("%s %s %s %d questions=%d tokens=%d+%d latency_ms=%.1f", rid, scope.get("method"), path,
                            code, state.get("questions", 0), state.get("prompt_tokens", 0),
                            state.get("completion_tokens", 0), seconds * 1000)


def _bearer_ok(header: bytes, key: str) -> bool:
    scheme, _, token = header.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


# ---- checks of texts before anything is queued

def text_problem(text: str, where: str) -> str | None:
    """Why a text cannot be answered, naming the field ``where`` (None: it can): not encodable as UTF-8 (a lone
    surrogate), or a control character other than newline and tab."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{where}: not valid Unicode (U+{ord(text[e.start]):04X} at character {e.start})"
    for i, c in enumerate(text):
        if c not in "\n\t" and unicodedata.category(c) == "Cc":
            return f"{where}: control character U+{ord(c):04X} at character {i}"
    return None


def _check_texts(texts: list[tuple[str, str]]) -> None:
    """422 naming every field whose text is refused."""
    problems = [p for t, where in texts if (p := text_problem(t, where))]
    if problems:
        raise ApiError(422, "invalid request", problems, param=problems[0].split(":", 1)[0], code="invalid_text")


def _problem(err: dict) -> str:
    """One readable line from a pydantic error: 'questions[2]: Input should be a valid string'."""
    return f"{_where(err)}: {err.get('msg', 'invalid')}"


def _where(err: dict) -> str:
    loc = [p for p in err.get("loc", ()) if p != "body"]
    where = ""
    for p in loc:
        where += f"[{p}]" if isinstance(p, int) else (f".{p}" if where else str(p))
    return where or "body"


@dataclass(frozen=True)
class Ask:
    """How a request is answered: ``mode`` "answer" (the service's setting, /v1/answer), "chat" (the chat template,
    answer to the end of the turn) or "complete" (raw text, no first-line cut); its own token limit (None: the
    mode's) and stop texts. Requests of different modes never share a batched pass (``group``)."""

    mode: str = "answer"
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def group(self) -> str:
        return self.mode


# ---- request and response bodies (the OpenAPI schema is generated from these)

class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    questions: list[StrictStr] = Field(
        description="Questions (prompts to complete): at least one, at most the service's max_questions "
                    "(GET /health, limits), each at most max_chars characters.",
        examples=[["The mother tongue of Danielle Darrieux is"]])
    explain: StrictBool = Field(False, description="Also return how each question was routed and the "
                                                   "base model's answer.")


class NearestEdit(BaseModel):
    index: int
    similarity: float
    id: str | None = None
    prompt: str | None = None
    target_new: str | None = None


class Explanation(BaseModel):
    question: str
    routed: bool = Field(description="The router sent the question to the edited knowledge.")
    exact: bool = Field(description="The question is an edit's own prompt, answered with that edit's fitted "
                                    "weights (attach.exact_prompts).")
    reason: str = Field(description="Why the question was or was not routed: 'routed', 'exact' (an edit's own "
                                    "prompt), 'threshold' (not close enough to any edit), 'no_subject' (names no "
                                    "edited subject; subject gate), 'relation' (names an edited subject but asks "
                                    "another fact of it; the relation check).")
    relation_cosine: float | None = Field(None, description="Where the relation check compared the question with "
                                                            "its nearest edit, subject masked in both: the cosine.")
    relation_cut: float | None = Field(None, description="The relation check's cut: below it, 'relation'.")
    confidence: float = Field(description="The router's confidence in [0, 1].")
    nearest_edits: list[NearestEdit]
    answer: str
    base_answer: str = Field(description="The unedited model's answer.")


class AnswerResponse(BaseModel):
    answers: list[str] = Field(description="One answer per question: the first line of the continuation.")
    explanations: list[Explanation] | None = Field(None, description="Present when explain was true.")


class ErrorBody(BaseModel):
    status: int
    message: str
    problems: list[str] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---- OpenAI-compatible request bodies (unknown fields are ignored, as OpenAI-compatible servers do; fields that
# would change the answer and are not supported are refused with 422)

class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] = Field(description="A string, or text parts (joined by newlines).")
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr = Field(description="The served model's id (GET /v1/models).")
    max_tokens: StrictInt | None = Field(None, ge=1, description="Tokens generated at most (default: the "
                                                                  "service's; at most max_completion_tokens).")
    temperature: float | None = Field(None, ge=0, le=2, description="Only 0 (greedy; the default): 422 otherwise.")
    top_p: float | None = Field(None, gt=0, le=1, description="Accepted; without effect on greedy answers.")
    n: StrictInt | None = Field(None, description="Only 1: 422 otherwise.")
    stop: StrictStr | list[StrictStr] | None = Field(None, description="Up to 4 texts that end the answer "
                                                                       "(not included in it).")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, description="Only 0.")
    frequency_penalty: float | None = Field(None, description="Only 0.")
    logit_bias: dict | None = Field(None, description="Not supported: 422 unless empty.")
    seed: int | None = Field(None, description="Accepted; answers are greedy.")
    user: StrictStr | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(description="The chat; routed on its last user message.")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="max_tokens under its newer name.")
    logprobs: StrictBool | None = Field(None, description="Not supported: 422 if true.")
    tools: list | None = Field(None, description="Not supported: 422 unless empty.")
    response_format: dict | None = Field(None, description="Only {\"type\": \"text\"}.")


class CompletionRequest(_OpenAIRequest):
    prompt: StrictStr | list[StrictStr] = Field(description="One prompt, or several (one choice each, at most "
                                                            "max_questions).")
    echo: StrictBool = Field(False, description="Not supported: 422 if true.")
    suffix: StrictStr | None = Field(None, description="Not supported: 422 if given.")
    best_of: StrictInt | None = Field(None, description="Only 1.")
    logprobs: StrictInt | None = Field(None, description="Not supported: 422 if given.")


def _refuse_unsupported(req: _OpenAIRequest, cfg: ServiceConfig, served: str) -> None:
    """404 for another model's name, 422 for options this service does not implement."""
    if req.model != served:
        raise ApiError(404, f"the model '{req.model}' does not exist; this service serves '{served}'",
                       param="model", code="model_not_found")
    refused = []
    if req.n not in (None, 1):
        refused.append(("n", f"n: {req.n}; only 1 answer per request is supported"))
    if req.temperature:
        refused.append(("temperature", f"temperature: {req.temperature}; answers are greedy, only 0 is supported"))
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            refused.append((name, f"{name}: only 0 is supported"))
    if req.logit_bias:
        refused.append(("logit_bias", "logit_bias: not supported"))
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            refused.append(("logprobs", "logprobs: not supported"))
        if req.tools:
            refused.append(("tools", "tools: not supported"))
        if req.response_format and req.response_format.get("type") != "text":
            refused.append(("response_format", "response_format: only {\"type\": \"text\"} is supported"))
    else:
        if req.echo:
            refused.append(("echo", "echo: not supported"))
        if req.suffix is not None:
            refused.append(("suffix", "suffix: not supported"))
        if req.best_of not in (None, 1):
            refused.append(("best_of", "best_of: only 1 is supported"))
        if req.logprobs is not None:
            refused.append(("logprobs", "logprobs: not supported"))
    limit = req.max_completion_tokens if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens \
        else req.max_tokens
    if limit is not None and limit > cfg.max_completion_tokens:
        refused.append(("max_tokens", f"max_tokens: {limit}; at most {cfg.max_completion_tokens}"))
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > 4:
        refused.append(("stop", f"stop: {len(stops)} texts; at most 4"))
    if any(not s for s in stops):
        refused.append(("stop", "stop: an empty text"))
    if refused:
        raise ApiError(422, "unsupported request", [why for _, why in refused], param=refused[0][0],
                       code="unsupported_value")
    _check_texts([(s, f"stop[{i}]") for i, s in enumerate(stops)])


def _ask_of(req: _OpenAIRequest, mode: str) -> Ask:
    limit = req.max_completion_tokens if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens \
        else req.max_tokens
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return Ask(mode=mode, max_new_tokens=limit, stop=tuple(stops))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(chunks: list[dict]):
    """Server-sent events: one ``data: {json}`` event per chunk, then ``data: [DONE]``."""
    async def events():
        for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    return events()


def create_app(answer_rows: Callable, cfg: ServiceConfig, model_info: dict):
    """The ASGI app; ``answer_rows(questions, explain_flags, asks)`` answers one batch with one ``Ask`` per
    question and returns (answers, explanations[, details]) (``Answerer``; any callable of that shape will do).
    When it has ``count_tokens(question, mode)`` and ``can_chat``, input lengths are checked in tokens and chat
    completions are offered. The FastAPI app is the result's ``fastapi`` attribute."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

    errors = {code: {"model": ErrorResponse, "description": why} for code, why in (
        (400, "The body is not JSON."), (401, "An API key is set and the request does not carry it."),
        (413, "Body, question count or a question too large."),
        (422, "The JSON has the wrong shape, or a text or option is refused."),
        (503, "The queue is full; retry after Retry-After seconds."),
        (500, "The model failed on the request (generic message; the log has the details)."))}

    batcher = Batcher(answer_rows, cfg.batch_config())
    metrics = Metrics()
    started = time.time()
    count_tokens = getattr(answer_rows, "count_tokens", None)
    answer_mode = getattr(answer_rows, "answer_mode", "answer")
    can_chat = bool(getattr(answer_rows, "can_chat", False))

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.close()

    app = FastAPI(title="meg: an edited language model", version=API_VERSION, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # the HTML viewers load scripts from the network
                  description="Answers questions with a base language model edited by MeG (one generated "
                              "neuron per routed question). Unrelated questions are answered by the base model "
                              "unchanged.")
    app.state.batcher = batcher
    app.state.metrics = metrics

    def request_id(request) -> str:
        return request.scope.get("state", {}).get("request_id", "-")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        openai = is_openai_path(request.url.path)
        if any(e.get("type") == "json_invalid" for e in errs):
            return _error_response(400, "the body is not valid JSON", openai=openai, code="invalid_json")
        if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errs):
            return _error_response(400, "the body is empty; expected a JSON object", openai=openai,
                                   code="invalid_json")
        return _error_response(422, "invalid request", [_problem(e) for e in errs], openai=openai,
                               param=_where(errs[0]) if errs else None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), openai=is_openai_path(request.url.path))

    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return _error_response(exc.status, exc.message, exc.problems, headers, openai=is_openai_path(request.url.path),
                               param=exc.param, code=exc.code)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        rid = request_id(request)
        log.error("request %s: %s %s failed: %s: %s", rid, request.method, request.url.path, type(exc).__name__, exc,
                  exc_info=exc)
        return _error_response(500, f"internal error (request id {rid})", openai=is_openai_path(request.url.path),
                               code="internal_error")

    def check_lengths(questions: list, where: list[str], mode: str) -> list[int]:
        """Tokens of each question's model input; 413 (naming the fields) beyond max_tokens_per_question."""
        if count_tokens is None:
            return [0] * len(questions)
        counts, long = [], []
        for q, w in zip(questions, where):
            try:
                n = count_tokens(q, mode)
            except Exception as e:  # e.g. a chat template that refuses the order of the messages
                raise ApiError(422, "invalid request", [f"{w}: cannot be rendered for the model: {e}"], param=w,
                               code="invalid_value") from e
            counts.append(n)
            if n > cfg.max_tokens_per_question:
                long.append(f"{w}: {n} tokens")
        if long:
            raise ApiError(413, f"questions longer than {cfg.max_tokens_per_question} tokens", long,
                           param=long[0].split(":", 1)[0], code="context_length_exceeded")
        return counts

    async def answered(request, questions: list, explain: bool, ask: Ask, prompt_tokens: list[int]):
        """The batched answer path of every endpoint: (answers, explanations, details) of this request."""
        state = request.scope.setdefault("state", {})
        state["questions"], state["prompt_tokens"] = len(questions), sum(prompt_tokens)
        try:
            future = batcher.submit(questions, explain, ask)
        except QueueFull as e:
            raise ApiError(503, f"busy: {e}", code="overloaded") from e
        except RuntimeError as e:
            raise ApiError(503, str(e), code="unavailable") from e
        try:
            result = await asyncio.wrap_future(future)
        except Exception as e:
            rid = request_id(request)
            log.error("request %s: answering %d questions failed: %s: %s", rid, len(questions), type(e).__name__, e,
                      exc_info=e)
            raise ApiError(500, f"internal error (request id {rid})", code="internal_error") from e
        answers, explanations = result[0], result[1]
        details = result[2] if len(result) > 2 else [{} for _ in answers]
        completion = sum(d.get("completion_tokens", 0) for d in details)
        state["completion_tokens"] = completion
        metrics.observe_answers(len(answers), sum(bool(d.get("routed")) for d in details), sum(prompt_tokens),
                                completion)
        return answers, explanations, details

    @app.get("/health", responses={503: {"model": dict, "description": "The batching worker is dead."}})
    async def health(request: Request):
        """Liveness and what is served: model, limits, queue and batching counters. 503 when the batching
        worker is dead. With an API key set, a request without it gets only the status."""
        alive = batcher.alive
        body: dict = {"status": "ok" if alive else "down"}
        if request.scope.get("state", {}).get("authorized", True):
            body.update({
                "model": model_info, "uptime_seconds": round(time.time() - started, 1),
                "limits": {k: getattr(cfg, k) for k in ("max_questions", "max_chars", "max_tokens_per_question",
                                                        "max_body_bytes", "max_new_tokens",
                                                        "max_completion_tokens")},
                "queue": {"waiting": batcher.waiting, "max": cfg.max_queue},
                "batching": {"max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms,
                             "worker_alive": alive, **batcher.stats.as_dict()}})
            if batcher.died is not None:
                body["batching"]["worker_error"] = type(batcher.died).__name__
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        """Prometheus text exposition format (0.0.4)."""
        return PlainTextResponse(metrics.render(batcher, cfg.max_queue),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/answer", response_model=AnswerResponse, response_model_exclude_none=True, responses=errors)
    async def answer(req: AnswerRequest, request: Request) -> dict:
        """Answer questions with the edited model; concurrent requests share one batched pass."""
        if not req.questions:
            raise ApiError(422, "invalid request", ["questions: must hold at least one question"])
        if len(req.questions) > cfg.max_questions:
            raise ApiError(413, f"{len(req.questions)} questions in one request; at most {cfg.max_questions}")
        long = [i for i, q in enumerate(req.questions) if len(q) > cfg.max_chars]
        if long:
            raise ApiError(413, f"questions longer than {cfg.max_chars} characters",
                           [f"questions[{i}]: {len(req.questions[i])} characters" for i in long])
        _check_texts([(q, f"questions[{i}]") for i, q in enumerate(req.questions)])
        blank = [f"questions[{i}]: blank question" for i, q in enumerate(req.questions) if not q.strip()]
        if blank:
            raise ApiError(422, "invalid request", blank)
        questions = [q.strip() for q in req.questions]
        tokens = check_lengths(questions, [f"questions[{i}]" for i in range(len(questions))], answer_mode)
        answers, explanations, _ = await answered(request, questions, req.explain, Ask(answer_mode), tokens)
        return {"answers": answers, **({"explanations": explanations} if req.explain else {})}

    # ---- OpenAI-compatible endpoints

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": int(started), "owned_by": "meg"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        """The one model served (OpenAI's model list)."""
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != cfg.model_name:
            raise ApiError(404, f"the model '{model_id}' does not exist; this service serves '{cfg.model_name}'",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", responses=errors)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        """OpenAI chat completion: the messages through the model's chat template; the edit is routed on the last
        user message. Greedy; ``stream`` sends the answer as server-sent events once its batched pass is done."""
        _refuse_unsupported(req, cfg, cfg.model_name)
        if not can_chat:
            raise ApiError(400, "the model has no chat template; use /v1/completions", param="messages",
                           code="no_chat_template")
        if not req.messages:
            raise ApiError(422, "invalid request", ["messages: must hold at least one message"], param="messages")
        roles = {"developer": "system"}  # OpenAI's newer name; chat templates know "system"
        messages = [{"role": roles.get(m.role, m.role), "content": m.text()} for m in req.messages]
        _check_texts([(m["content"], f"messages[{i}].content") for i, m in enumerate(messages)])
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users or not messages[users[-1]]["content"].strip():
            raise ApiError(422, "invalid request", ["messages: the last user message must hold a question"],
                           param="messages")
        long = [f"messages[{i}].content: {len(m['content'])} characters" for i, m in enumerate(messages)
                if len(m["content"]) > cfg.max_chars]
        if long:
            raise ApiError(413, f"messages longer than {cfg.max_chars} characters", long,
                           param=long[0].split(":", 1)[0], code="context_length_exceeded")
        tokens = check_lengths([messages], ["messages"], "chat")
        answers, _, details = await answered(request, [messages], False, _ask_of(req, "chat"), tokens)
        rid, created = request_id(request), int(time.time())
        head = {"id": f"chatcmpl-{rid}", "created": created, "model": cfg.model_name}
        usage = _usage(tokens[0], details[0].get("completion_tokens", 0))
        reason = details[0].get("finish_reason", "stop")
        if not req.stream:
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answers[0]},
                                 "finish_reason": reason, "logprobs": None}],
                    "usage": usage}
        chunk = {**head, "object": "chat.completion.chunk"}
        chunks = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None, "logprobs": None}]},
                  {**chunk, "choices": [{"index": 0, "delta": {"content": answers[0]}, "finish_reason": None,
                                         "logprobs": None}]},
                  {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": reason, "logprobs": None}]}]
        if req.stream_options and req.stream_options.include_usage:
            chunks.append({**chunk, "choices": [], "usage": usage})
        return StreamingResponse(_sse(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", responses=errors)
    async def completions(req: CompletionRequest, request: Request):
        """OpenAI completion: each prompt continued as raw text (no chat template, not cut at its first line;
        the neuron is switched off once a routed prompt's answer states the edit's target). Greedy."""
        _refuse_unsupported(req, cfg, cfg.model_name)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        where = ["prompt"] if isinstance(req.prompt, str) else [f"prompt[{i}]" for i in range(len(prompts))]
        if not prompts:
            raise ApiError(422, "invalid request", ["prompt: must hold at least one prompt"], param="prompt")
        if len(prompts) > cfg.max_questions:
            raise ApiError(413, f"{len(prompts)} prompts in one request; at most {cfg.max_questions}", param="prompt",
                           code="too_many_prompts")
        _check_texts(list(zip(prompts, where)))
        blank = [f"{w}: blank prompt" for p, w in zip(prompts, where) if not p.strip()]
        if blank:
            raise ApiError(422, "invalid request", blank, param=blank[0].split(":", 1)[0])
        long = [f"{w}: {len(p)} characters" for p, w in zip(prompts, where) if len(p) > cfg.max_chars]
        if long:
            raise ApiError(413, f"prompts longer than {cfg.max_chars} characters", long,
                           param=long[0].split(":", 1)[0], code="context_length_exceeded")
        tokens = check_lengths(prompts, where, "complete")
        answers, _, details = await answered(request, prompts, False, _ask_of(req, "complete"), tokens)
        rid, created = request_id(request), int(time.time())
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": cfg.model_name}
        usage = _usage(sum(tokens), sum(d.get("completion_tokens", 0) for d in details))
        reasons = [d.get("finish_reason", "stop") for d in details]
        if not req.stream:
            return {**head, "choices": [{"index": i, "text": a, "finish_reason": r, "logprobs": None}
                                        for i, (a, r) in enumerate(zip(answers, reasons))], "usage": usage}
        chunks = [{**head, "choices": [{"index": i, "text": a, "finish_reason": None, "logprobs": None}]}
                  for i, a in enumerate(answers)]
        chunks += [{**head, "choices": [{"index": i, "text": "", "finish_reason": r, "logprobs": None}]}
                   for i, r in enumerate(reasons)]
        if req.stream_options and req.stream_options.include_usage:
            chunks.append({**head, "choices": [], "usage": usage})
        return StreamingResponse(_sse(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    inner = BodyLimit(app, cfg.max_body_bytes) if cfg.max_body_bytes else app
    outer = Observe(inner, metrics, cfg.api_key)
    outer.fastapi = app
    return outer


# ---- wiring to a model


class Answerer:
    """The service's answer function for one model: ``(questions, explain flags, asks)`` ->
    (answers, explanations, details), one batched pass of ``meg.answer.answer_detail`` (or
    ``base_answer_detail`` for the unedited base model).

    All asks of one call share a mode (the batcher groups by it): "answer" is the service's own setting,
    "chat" the chat template (answer to the end of the turn), "complete" raw text continued up to the token
    limit or a stop text, its routed neuron switched off once the answer states the edit's target.
    ``count_tokens`` measures a question's model input with its own copy of the tokenizer (a tokenizer is not
    safe to share between the request thread and the worker)."""

    def __init__(self, model, cfg, base_only: bool = False):
        from meg import generation

        self.model, self.base_only = model, base_only
        tok = model.loaded.tokenizer
        self._tok = copy.deepcopy(tok)
        self.can_chat = generation.has_chat_template(tok)
        self.configs = {"answer": cfg.resolved(tok),
                        "complete": replace(cfg, chat=False, stop_at_newline=False, release=True,
                                            raw_text=True).resolved(tok)}
        if self.can_chat:
            self.configs["chat"] = replace(cfg, chat=True).resolved(tok)
        # /v1/answer's mode: "chat" when the service asks questions as chat turns anyway, so that its requests
        # and chat completions share passes
        self.answer_mode = "chat" if self.configs["answer"] == self.configs.get("chat") else "answer"

    def __call__(self, questions: list, explain: list[bool], asks: list[Ask] | None = None):
        from meg.answer import answer_detail, base_answer_detail

        mode = asks[0].mode if asks else "answer"
        if asks and any(a.mode != mode for a in asks):
            raise ValueError("one batched pass holds one mode of questions")
        limits = [a.max_new_tokens for a in asks] if asks else None
        stops = [a.stop for a in asks] if asks else None
        if self.base_only:
            return base_answer_detail(self.model.loaded, questions, explain, self.configs[mode], limits, stops)
        return answer_detail(self.model, questions, explain, self.configs[mode], limits, stops)

    def count_tokens(self, question, mode: str = "answer") -> int:
        from meg.answer import render

        chat = self.configs[mode].chat
        return len(self._tok(render(self._tok, question, chat), add_special_tokens=not chat).input_ids)


def model_answerer(model_ref, cfg: ServiceConfig, base_only: bool = False) -> tuple[Answerer, dict]:
    """(answerer, description) for a bundle or registry reference; ``base_only`` serves its base model."""
    from meg.bundle import open_model

    model = model_ref if hasattr(model_ref, "answer") else open_model(model_ref)
    acfg = cfg.answer_config()
    if not base_only:  # what the speed options precompute (weight_cache "edit"), now, not on the first request
        model.source.prepare(acfg.sample_steps, acfg.weight_cache == "edit")
    info = {"bundle": None if model is model_ref else str(model_ref), "name": cfg.model_name,
            "base_model": model.loaded.model_id, "n_edits": model.info.get("n_edits"), "layer": model.layer,
            "router": model.cfg.router, "weights": model.cfg.weights, "edited": not base_only,
            "sample_steps": acfg.sample_steps, "weight_cache": acfg.weight_cache,
            "chat": acfg.resolved(model.loaded.tokenizer).chat}
    return Answerer(model, acfg, base_only), info


def run_service(model_ref, cfg: ServiceConfig, base_only: bool = False) -> None:
    """Load the model and serve until interrupted (Ctrl-C). Logs (access lines included) go to stderr."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    answer_rows, info = model_answerer(model_ref, cfg, base_only)
    app = create_app(answer_rows, cfg, info)
    print(f"meg: serving {'the base model of ' if base_only else ''}{model_ref} as '{cfg.model_name}' on "
          f"http://{cfg.host}:{cfg.port} (POST /v1/answer, /v1/chat/completions, /v1/completions; GET /v1/models, "
          f"/health, /metrics, /openapi.json){'; API key required' if cfg.api_key else ''}", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)


class BackgroundService:
    """The service on a loopback port in a background thread (tests, benchmarks); a context manager."""

    def __init__(self, answer_rows: Callable, cfg: ServiceConfig, model_info: dict | None = None):
        import uvicorn

        self.cfg = cfg
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((cfg.host, cfg.port))
        self.port = self._sock.getsockname()[1]
        app = create_app(answer_rows, cfg, model_info or {})
        self.batcher = app.fastapi.state.batcher
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def __enter__(self) -> "BackgroundService":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def openapi_schema(cfg: ServiceConfig | None = None) -> dict:
    """The service's OpenAPI schema, without a model (for docs and checks)."""
    return create_app(lambda q, e, a=None: ([], []), cfg or ServiceConfig(), {}).fastapi.openapi()
