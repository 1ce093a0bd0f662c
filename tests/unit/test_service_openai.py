"""The OpenAI-compatible endpoints, per-request failures, logs, metrics and the API key, on a real tiny bundle,
through the official ``openai`` client against a running service."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from meg.answer import AnswerConfig, answer_detail, base_answer_detail  # noqa: E402
from meg.errors import ConfigError  # noqa: E402
from meg.service import BackgroundService, ServiceConfig, model_answerer  # noqa: E402
from tests.tiny_bundle import UNRELATED, tiny_bundle, tiny_edits, tiny_loaded  # noqa: E402
from tests.unit.test_service import ask_at_once, call  # noqa: E402

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def model():
    import torch

    torch.set_num_threads(1)
    from meg.editor import EditedModel

    return EditedModel.load(tiny_bundle(), loaded=tiny_loaded())


@pytest.fixture(scope="module")
def service(model):
    # /v1/answer completes raw text (the tiny bundle was fitted on raw prompts); chat completions use the template
    cfg = ServiceConfig(port=0, max_wait_ms=20, max_questions=8, max_chars=300, max_tokens_per_question=60,
                        max_completion_tokens=64, chat=False, model_name="tiny-meg")
    answer_rows, info = model_answerer(model, cfg)
    with BackgroundService(answer_rows, cfg, info) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0, timeout=120)


COMPLETE = AnswerConfig(chat=False, stop_at_newline=False, release=True, raw_text=True)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-meg"] and models.data[0].owned_by == "meg"
    assert client.models.retrieve("tiny-meg").id == "tiny-meg"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completions_route_each_prompt_as_the_library_does(client, model):
    edits = tiny_edits()
    prompts = [e.prompt for e in edits[:4]]
    got = client.completions.create(model="tiny-meg", prompt=prompts, max_tokens=12)
    texts, _, details = answer_detail(model, prompts, [False] * 4, COMPLETE, [12] * 4)
    assert got.object == "text_completion" and got.id.startswith("cmpl-") and got.model == "tiny-meg"
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == texts
    assert all(d["routed"] for d in details)
    assert sum(c.text.strip().startswith(e.target_new) for c, e in zip(got.choices, edits)) >= 2  # the edits
    tok = tiny_loaded().tokenizer
    assert got.usage.prompt_tokens == sum(len(tok(p).input_ids) for p in prompts)
    assert got.usage.completion_tokens == sum(d["completion_tokens"] for d in details) > 0
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    # an unrelated prompt is not routed: the base model's continuation, token for token
    alone = client.completions.create(model="tiny-meg", prompt=UNRELATED[0], max_tokens=12)
    base = base_answer_detail(tiny_loaded(), [UNRELATED[0]], [False], COMPLETE, [12])[0]
    assert alone.choices[0].text == base[0]


def test_completions_stop_texts_and_token_limits(client):
    prompt = UNRELATED[1]
    full = client.completions.create(model="tiny-meg", prompt=prompt, max_tokens=16).choices[0]
    assert full.finish_reason == "length"  # a random model writes on to the limit
    short = client.completions.create(model="tiny-meg", prompt=prompt, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert full.text.startswith(short.choices[0].text)  # greedy: a shorter limit cuts the same answer
    words = full.text.split()
    stop = words[2]
    cut = client.completions.create(model="tiny-meg", prompt=prompt, max_tokens=16, stop=[stop, "@@@"]).choices[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"


def test_rows_of_one_pass_keep_their_own_limits_and_stop_texts(model):
    """Requests with different max_tokens and stop texts share a pass; each row answers as it would alone."""
    prompts = [UNRELATED[0], tiny_edits()[3].prompt, UNRELATED[2]]
    free = answer_detail(model, [prompts[2]], [False], COMPLETE, [12])[0][0]
    stop = (free.split()[1],)
    limits, stops = [3, 12, 12], [(), (), stop]
    together = answer_detail(model, prompts, [False] * 3, COMPLETE, limits, stops)
    alone = [answer_detail(model, [p], [False], COMPLETE, [m], [st]) for p, m, st in zip(prompts, limits, stops)]
    assert together[0] == [a[0][0] for a in alone] and together[2] == [a[2][0] for a in alone]
    assert together[2][0]["completion_tokens"] == 3 and together[2][0]["finish_reason"] == "length"
    assert together[0][2] == free[:free.index(stop[0])] and together[2][2]["finish_reason"] == "stop"
    assert together[2][1]["routed"] and not together[2][0]["routed"]


def test_chat_completion_routes_the_last_user_turn(client, model, service):
    edit = tiny_edits()[0]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hello! Ask me anything."}, {"role": "user", "content": edit.prompt}]
    got = client.chat.completions.create(model="tiny-meg", messages=messages, max_tokens=10)
    texts, _, details = answer_detail(model, [messages], [False], AnswerConfig(chat=True), [10])
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == texts[0]
    assert details[0]["routed"]  # routed on the last user turn, not on the whole chat
    tok = tiny_loaded().tokenizer
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert got.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
    assert got.usage.completion_tokens == details[0]["completion_tokens"]
    assert got.choices[0].finish_reason == details[0]["finish_reason"]
    # the same question through /v1/answer of a chat service gives the same answer (one answer path)
    unrelated = [{"role": "user", "content": UNRELATED[2]}]
    plain = client.chat.completions.create(model="tiny-meg", messages=unrelated).choices[0].message.content
    assert plain == model.answer([UNRELATED[2]])["answers"][0]


def test_chat_streaming_sends_the_same_answer_as_server_sent_events(client, service):
    messages = [{"role": "user", "content": tiny_edits()[1].prompt}]
    whole = client.chat.completions.create(model="tiny-meg", messages=messages, max_tokens=8)
    stream = client.chat.completions.create(model="tiny-meg", messages=messages, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens and not chunks[-1].choices
    # on the wire: data events, the last one [DONE]
    import urllib.request

    body = json.dumps({"model": "tiny-meg", "messages": messages, "max_tokens": 8, "stream": True}).encode()
    req = urllib.request.Request(service.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    stream = client.completions.create(model="tiny-meg", prompt=[UNRELATED[0], UNRELATED[1]], max_tokens=5,
                                       stream=True)
    texts = {0: "", 1: ""}
    for c in stream:
        for choice in c.choices:
            texts[choice.index] += choice.text
    whole = client.completions.create(model="tiny-meg", prompt=[UNRELATED[0], UNRELATED[1]], max_tokens=5)
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]


@pytest.mark.parametrize("kwargs, status, param", [
    ({"n": 2}, 422, "n"),
    ({"temperature": 0.7}, 422, "temperature"),
    ({"max_tokens": 65}, 422, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"model": "gpt-4o"}, 404, "model"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 422, "tools"),
    ({"messages": [{"role": "user", "content": "bell\u0007"}]}, 422, "messages[0].content"),
    ({"messages": [{"role": "system", "content": "only a system turn"}]}, 422, "messages"),
    ({"messages": [{"role": "user", "content": "a " * 70}]}, 413, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages[0].role"),
])
def test_chat_errors_take_openais_shape(client, kwargs, status, param):
    args = {"model": "tiny-meg", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**args)
    assert err.value.status_code == status
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param
    assert body["type"] == "invalid_request_error" and body["message"]


def test_bad_bodies_on_openai_endpoints(service):
    status, body, _ = call(service.url, "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "status" not in body["error"]
    status, body, _ = call(service.url, "/v1/completions", b'{"model": "tiny-meg", "prompt": "a \\ud800 b"}')
    assert status == 422 and body["error"]["param"] == "prompt" and "U+D800" in body["error"]["message"]
    status, body, _ = call(service.url, "/v1/completions", {"model": "tiny-meg", "prompt": ["ok", "  "]})
    assert status == 422 and body["error"]["param"] == "prompt[1]"
    status, body, _ = call(service.url, "/v1/completions", {"model": "tiny-meg", "prompt": "x", "echo": True})
    assert status == 422 and body["error"]["param"] == "echo"
    status, body, _ = call(service.url, "/v1/nothing", {})
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_access_log_and_metrics(service, caplog):
    caplog.set_level(logging.INFO, logger="meg.access")
    status, body, headers = call(service.url, "/v1/answer", {"questions": [tiny_edits()[0].prompt, UNRELATED[0]]})
    assert status == 200
    rid = headers["x-request-id"]

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "meg.access" and r.getMessage().startswith(rid)]

    # the line is written once the response has gone out, so it may follow the client's read by a moment
    lines = eventually(logged)
    assert len(lines) == 1
    m = re.fullmatch(rf"{rid} POST /v1/answer 200 questions=2 tokens=(\d+)\+(\d+) latency_ms=([\d.]+)", lines[0])
    assert m and int(m[1]) > 0 and int(m[2]) > 0 and float(m[3]) > 0
    assert call(service.url, "/v1/answer", {"questions": ["bell\u0007"]})[0] == 422

    def with_422() -> str | None:  # counted, like the log line, once the response has gone out
        text = _metrics(service)
        return text if 'meg_requests_total{endpoint="/v1/answer",status="422"}' in text else None

    text = eventually(with_422)
    assert _sample(text, 'meg_requests_total{endpoint="/v1/answer",status="422"}') >= 1
    answered = _sample(text, 'meg_requests_total{endpoint="/v1/answer",status="200"}')
    assert answered >= 1 and _sample(text, 'meg_request_duration_seconds_count{endpoint="/v1/answer"}') >= answered + 1
    assert _sample(text, 'meg_request_duration_seconds_bucket{endpoint="/v1/answer",le="+Inf"}') == \
        _sample(text, 'meg_request_duration_seconds_count{endpoint="/v1/answer"}')
    questions, routed = _sample(text, "meg_questions_total"), _sample(text, "meg_questions_routed_total")
    assert questions >= 2 and 1 <= routed < questions  # the edit prompt was routed, the unrelated one not
    assert _sample(text, "meg_routed_share") == pytest.approx(routed / questions, abs=1e-6)
    assert _sample(text, "meg_queue_questions") == 0 and _sample(text, "meg_worker_up") == 1
    assert "# TYPE meg_request_duration_seconds histogram" in text


def _metrics(service) -> str:
    import urllib.request

    with urllib.request.urlopen(service.url + "/metrics", timeout=30) as r:
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def eventually(get, timeout: float = 10.0):
    """``get()`` once it returns something truthy (polled), or its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (got := get()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}")


def test_health_is_503_once_the_batching_worker_is_dead(model):
    answer_rows, info = model_answerer(model, ServiceConfig())

    def dies(questions, explain, asks):
        raise SystemExit("worker gone")  # escapes the retry: the worker thread ends

    with BackgroundService(dies, ServiceConfig(port=0, max_wait_ms=0), info) as svc:
        assert call(svc.url, "/health")[0] == 200
        status, body, _ = call(svc.url, "/v1/answer", {"questions": ["anything"]})
        assert status == 500 and "worker gone" not in json.dumps(body)
        status, body, _ = call(svc.url, "/health")
        assert status == 503 and body["status"] == "down" and body["batching"]["worker_alive"] is False
        status, body, _ = call(svc.url, "/v1/answer", {"questions": ["anything"]})
        assert status == 503 and "stopped" in body["error"]["message"]
        assert _sample(_metrics(svc), "meg_worker_up") == 0


def test_an_api_key_guards_everything_but_the_short_health(model):
    cfg = ServiceConfig(port=0, max_wait_ms=0, chat=False, api_key=KEY)
    answer_rows, info = model_answerer(model, cfg)
    with BackgroundService(answer_rows, cfg, info) as svc:
        status, body, headers = call(svc.url, "/v1/answer", {"questions": [UNRELATED[0]], "explain": True})
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        status, body, _ = call(svc.url, "/health")
        assert status == 200 and body == {"status": "ok"}  # no model, limits or counters without the key
        wrong = openai.OpenAI(base_url=svc.url + "/v1", api_key="wrong-key-000", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.models.list()
        assert err.value.body["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=svc.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        assert right.completions.create(model="meg", prompt=UNRELATED[0], max_tokens=2).usage.completion_tokens == 2
        import urllib.request

        req = urllib.request.Request(svc.url + "/health", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert "batching" in json.loads(r.read())
    with pytest.raises(ConfigError, match="API key is required"):
        ServiceConfig(host="0.0.0.0")
    assert ServiceConfig(host="0.0.0.0", api_key=KEY).host == "0.0.0.0"
    assert ServiceConfig(host="::1").api_key is None


def test_a_bad_request_among_concurrent_ones_fails_alone(service):
    questions = [tiny_edits()[2].prompt, UNRELATED[1], "bell\u0007", UNRELATED[2]]
    results = ask_at_once(service.url, questions)
    assert [r[0] for r in results] == [200, 200, 422, 200]
    assert "questions[0]: control character U+0007 at character 4" in results[2][1]["error"]["problems"]


def test_on_a_chat_service_answers_and_chat_completions_share_passes(model):
    answer_rows, info = model_answerer(model, ServiceConfig())
    assert answer_rows.answer_mode == "chat"
    gate, entered = threading.Event(), threading.Event()

    def held(questions, explain, asks):
        entered.set()
        gate.wait(60)
        return answer_rows(questions, explain, asks)

    held.count_tokens, held.can_chat, held.answer_mode = answer_rows.count_tokens, True, answer_rows.answer_mode
    question = tiny_edits()[4].prompt
    chat_body = {"model": "meg", "messages": [{"role": "user", "content": question}]}
    with BackgroundService(held, ServiceConfig(port=0, max_wait_ms=0), info) as svc, ThreadPoolExecutor(3) as ex:
        first = ex.submit(call, svc.url, "/v1/answer", {"questions": [UNRELATED[0]]})
        assert entered.wait(30)
        plain = ex.submit(call, svc.url, "/v1/answer", {"questions": [question]})
        chat = ex.submit(call, svc.url, "/v1/chat/completions", chat_body)
        while svc.batcher.waiting < 2:
            time.sleep(0.01)
        gate.set()
        assert first.result(60)[0] == plain.result(60)[0] == chat.result(60)[0] == 200
        assert svc.batcher.stats.batches == 2 and svc.batcher.stats.largest == 2  # the two shared a pass
    assert chat.result()[1]["choices"][0]["message"]["content"] == plain.result()[1]["answers"][0]
