"""The HTTP service of an edited model (`meg serve`): FastAPI on uvicorn, micro-batched answers.

Endpoints
  GET  /health        status, the model served, queue and batching counters
  POST /v1/answer     {"questions": [str, ...], "explain": false} -> {"answers": [str, ...]}
                      (+ "explanations" when explain is true)
  GET  /openapi.json  the OpenAPI 3 schema of the above

Concurrent requests are gathered by ``meg.batcher.Batcher`` and answered in ONE batched pass with
per-question neuron weights (``meg.answer.answer_rows``), so answers do not depend on what else was
in the batch (up to floating-point rounding of batched products).

Errors are JSON ``{"error": {"status": N, "message": "...", "problems": [...]}}``:
  400 the body is empty or not JSON;
  413 the body, the number of questions or a question is larger than the configured limits;
  422 the JSON has the wrong shape: not an object, unknown field, questions not a non-empty list of
      non-blank strings, explain not a boolean;
  503 the queue is full (``Retry-After`` says when to retry);
  500 the model failed on the batch (the message says why).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from meg.batcher import BatchConfig, Batcher, QueueFull
from meg.errors import ConfigError

API_VERSION = "1"


@dataclass
class ServiceConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing the service is a deliberate choice
    port: int = 8000  # 0 = any free port (tests)
    max_questions: int = 32  # questions per request at most (413 beyond)
    max_chars: int = 2000  # characters per question at most (413 beyond)
    max_body_bytes: int = 1 << 20  # request body bytes at most (413 beyond), checked before parsing
    max_batch_size: int = 32  # questions per batched pass
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # questions waiting at most (503 beyond)
    max_new_tokens: int | None = None  # tokens generated per answer at most (None: 40 in chat, 20 completing)
    # ask every question as a user turn of the model's chat template (None: when it has one; False: complete raw text)
    chat: bool | None = None
    sample_steps: int | None = None  # generator denoising steps (None: the bundle's); see meg.answer.AnswerConfig
    weight_cache: str = "off"  # "edit": generate weights once per edit and reuse them; see meg.answer.AnswerConfig
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self) -> None:
        for name in ("max_questions", "max_chars", "max_body_bytes", "max_new_tokens"):
            value = getattr(self, name)
            if value is None and name == "max_new_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"service: bad value for '{name}': {value!r} (an integer >= 1)")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"service: bad value for 'port': {self.port!r} (0-65535)")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"service: bad value for 'threads': {self.threads!r} (an integer >= 1 or null)")
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


class ApiError(Exception):
    def __init__(self, status: int, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.status, self.message, self.problems = status, message, problems or []


def _error_response(status: int, message: str, problems: list[str] | None = None, headers: dict | None = None):
    from starlette.responses import JSONResponse

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
        too_big = f"request body larger than {self.limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error_response(413, too_big)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _error_response(413, too_big)(scope, receive, send)
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


def _problem(err: dict) -> str:
    """One readable line from a pydantic error: 'questions[2]: Input should be a valid string'."""
    loc = [p for p in err.get("loc", ()) if p != "body"]
    where = ""
    for p in loc:
        where += f"[{p}]" if isinstance(p, int) else (f".{p}" if where else str(p))
    return f"{where or 'body'}: {err.get('msg', 'invalid')}"


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


def create_app(answer_rows: Callable, cfg: ServiceConfig, model_info: dict):
    """The FastAPI app; ``answer_rows(questions, explain_flags)`` answers one batch (meg.answer)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    errors = {code: {"model": ErrorResponse, "description": why} for code, why in (
        (400, "The body is not JSON."), (413, "Body, question count or a question too large."),
        (422, "The JSON has the wrong shape."), (503, "The queue is full; retry after Retry-After seconds."),
        (500, "The model failed on the batch."))}

    batcher = Batcher(answer_rows, cfg.batch_config())
    started = time.time()

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

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return _error_response(400, "the body is not valid JSON")
        if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errs):
            return _error_response(400, "the body is empty; expected a JSON object")
        return _error_response(422, "invalid request", [_problem(e) for e in errs])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return _error_response(exc.status, exc.message, exc.problems, headers)

    @app.get("/health")
    async def health() -> dict:
        """Liveness and what is served: model, limits, queue and batching counters."""
        return {"status": "ok", "model": model_info, "uptime_seconds": round(time.time() - started, 1),
                "limits": {k: getattr(cfg, k) for k in ("max_questions", "max_chars", "max_body_bytes",
                                                        "max_new_tokens")},
                "queue": {"waiting": batcher.waiting, "max": cfg.max_queue},
                "batching": {"max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms,
                             **batcher.stats.as_dict()}}

    @app.post("/v1/answer", response_model=AnswerResponse, response_model_exclude_none=True, responses=errors)
    async def answer(req: AnswerRequest) -> dict:
        """Answer questions with the edited model; concurrent requests share one batched pass."""
        if not req.questions:
            raise ApiError(422, "invalid request", ["questions: must hold at least one question"])
        if len(req.questions) > cfg.max_questions:
            raise ApiError(413, f"{len(req.questions)} questions in one request; at most {cfg.max_questions}")
        long = [i for i, q in enumerate(req.questions) if len(q) > cfg.max_chars]
        if long:
            raise ApiError(413, f"questions longer than {cfg.max_chars} characters",
                           [f"questions[{i}]: {len(req.questions[i])} characters" for i in long])
        blank = [f"questions[{i}]: blank question" for i, q in enumerate(req.questions) if not q.strip()]
        if blank:
            raise ApiError(422, "invalid request", blank)
        try:
            future = batcher.submit([q.strip() for q in req.questions], req.explain)
        except QueueFull as e:
            raise ApiError(503, f"busy: {e}") from e
        except RuntimeError as e:
            raise ApiError(503, str(e)) from e
        try:
            answers, explanations = await asyncio.wrap_future(future)
        except Exception as e:  # the model failed on the batch
            raise ApiError(500, f"answering failed: {type(e).__name__}: {e}") from e
        return {"answers": answers, **({"explanations": explanations} if req.explain else {})}

    return BodyLimit(app, cfg.max_body_bytes) if cfg.max_body_bytes else app


# ---- wiring to a model


def model_answerer(model_ref, cfg: ServiceConfig, base_only: bool = False) -> tuple[Callable, dict]:
    """(answer_rows, description) for a bundle or registry reference; ``base_only`` serves its base model."""
    from meg.answer import answer_rows, base_answer_rows
    from meg.bundle import open_model

    model = model_ref if hasattr(model_ref, "answer") else open_model(model_ref)
    acfg = cfg.answer_config()
    if not base_only:  # what the speed options precompute (weight_cache "edit"), now, not on the first request
        model.source.prepare(acfg.sample_steps, acfg.weight_cache == "edit")
    info = {"bundle": None if model is model_ref else str(model_ref),
            "base_model": model.loaded.model_id, "n_edits": model.info.get("n_edits"), "layer": model.layer,
            "router": model.cfg.router, "weights": model.cfg.weights, "edited": not base_only,
            "sample_steps": acfg.sample_steps, "weight_cache": acfg.weight_cache,
            "chat": acfg.resolved(model.loaded.tokenizer).chat}
    if base_only:
        return partial(base_answer_rows, model.loaded, cfg=acfg), info
    return partial(answer_rows, model, cfg=acfg), info


def run_service(model_ref, cfg: ServiceConfig, base_only: bool = False) -> None:
    """Load the model and serve until interrupted (Ctrl-C)."""
    import uvicorn

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    answer_rows, info = model_answerer(model_ref, cfg, base_only)
    app = create_app(answer_rows, cfg, info)
    print(f"meg: serving {'the base model of ' if base_only else ''}{model_ref} on http://{cfg.host}:{cfg.port} "
          f"(POST /v1/answer, GET /health, GET /openapi.json)", flush=True)
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
        self.batcher = (app.app if isinstance(app, BodyLimit) else app).state.batcher
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
    app = create_app(lambda q, e: ([], []), cfg or ServiceConfig(), {})
    return app.app.openapi() if isinstance(app, BodyLimit) else app.openapi()

