"""The HTTP service on a loopback port, on a real tiny bundle: answers, batching, errors, schema."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from meg.errors import ConfigError
from meg.service import BackgroundService, ServiceConfig, model_answerer, openapi_schema
from tests.tiny_bundle import UNRELATED, tiny_bundle, tiny_edits, tiny_loaded


def call(url: str, path: str, body: bytes | dict | None = None, method: str | None = None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def ask_at_once(url: str, questions: list[str]) -> list[tuple[int, dict, dict]]:
    """One /v1/answer request per question, all released at the same moment (so they share batched passes)."""
    barrier = threading.Barrier(len(questions))

    def ask(q):
        barrier.wait(30)
        return call(url, "/v1/answer", {"questions": [q]})

    with ThreadPoolExecutor(len(questions)) as ex:
        return list(ex.map(ask, questions))


@pytest.fixture(scope="module")
def model():
    from meg.editor import EditedModel

    return EditedModel.load(tiny_bundle(), loaded=tiny_loaded())


@pytest.fixture(scope="module")
def service(model):
    # raw completion: the tiny bundle was fitted on raw prompts (chat use is tested below)
    cfg = ServiceConfig(port=0, max_wait_ms=30, max_questions=8, max_batch_size=32, max_chars=200,
                        max_tokens_per_question=50, max_body_bytes=4096, chat=False)
    answer_rows, info = model_answerer(model, cfg)
    with BackgroundService(answer_rows, cfg, info) as svc:
        yield svc


def test_a_chat_service_asks_user_turns_as_the_library_does(model):
    cfg = ServiceConfig(port=0, max_wait_ms=30, max_questions=8, max_batch_size=32)
    answer_rows, info = model_answerer(model, cfg)
    assert info["chat"] is True  # the default for a model with a chat template
    questions = [tiny_edits()[0].prompt, UNRELATED[0]]
    with BackgroundService(answer_rows, cfg, info) as svc:
        status, body, _ = call(svc.url, "/v1/answer", {"questions": questions, "explain": True})
    assert status == 200 and body == model.answer(questions, explain=True)


def test_health_describes_the_model(service):
    status, body, _ = call(service.url, "/health")
    assert status == 200 and body["status"] == "ok"
    assert body["model"]["base_model"] == tiny_loaded().model_id and body["model"]["n_edits"] == len(tiny_edits())
    assert body["limits"]["max_questions"] == 8 and body["queue"]["max"] == 256


def test_edited_paraphrased_and_unrelated_questions(service, model):
    edits = tiny_edits()
    questions = [e.prompt for e in edits] + [e.paraphrases[0] for e in edits] + list(UNRELATED)
    expected = model.answer(questions, explain=True, chat=False)
    got = []
    for i in range(0, len(questions), 8):
        status, body, _ = call(service.url, "/v1/answer", {"questions": questions[i:i + 8], "explain": True})
        assert status == 200, body
        got.append(body)
    answers = [a for b in got for a in b["answers"]]
    explanations = [e for b in got for e in b["explanations"]]
    assert answers == expected["answers"]  # the service answers exactly as the library does
    assert explanations == expected["explanations"]
    n = len(edits)
    assert sum(a.startswith(e.target_new) for a, e in zip(answers[:n], edits)) >= n // 2  # edits took effect
    assert all(x["routed"] for x in explanations[:n])
    for x in explanations[2 * n:]:  # unrelated: not routed, the base model's answer
        assert not x["routed"] and x["answer"] == x["base_answer"]
    status, body, _ = call(service.url, "/v1/answer", {"questions": questions[:2]})
    assert status == 200 and "explanations" not in body


def test_concurrent_requests_get_the_same_answers_as_sequential_ones(service):
    edits = tiny_edits()
    questions = [e.prompt for e in edits] + [e.paraphrases[0] for e in edits] + list(UNRELATED)
    sequential = [call(service.url, "/v1/answer", {"questions": [q]})[1]["answers"][0] for q in questions]
    before = call(service.url, "/health")[1]["batching"]
    results = ask_at_once(service.url, questions)
    assert all(status == 200 for status, _, _ in results)
    assert [body["answers"][0] for _, body, _ in results] == sequential
    after = call(service.url, "/health")[1]["batching"]
    passes = after["batches"] - before["batches"]
    assert after["questions"] - before["questions"] == len(questions)
    assert passes < len(questions) and after["largest_batch"] > 1  # concurrent requests shared passes


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "body is empty"),
    (b"[\"a question\"]", 422, "body"),
    (json.dumps({"questions": []}).encode(), 422, "at least one question"),
    (json.dumps({"questions": "one question"}).encode(), 422, "questions"),
    (json.dumps({"questions": ["ok", 3]}).encode(), 422, "questions[1]"),
    (json.dumps({"questions": ["ok"], "explain": "yes"}).encode(), 422, "explain"),
    (json.dumps({"questions": ["ok"], "temperature": 2}).encode(), 422, "temperature"),
    (json.dumps({"question": ["ok"]}).encode(), 422, "questions"),
    (json.dumps({"questions": ["ok", "   "]}).encode(), 422, "questions[1]: blank"),
    (json.dumps({"questions": ["q"] * 9}).encode(), 413, "at most 8"),
    (json.dumps({"questions": ["ok", "x" * 201]}).encode(), 413, "questions[1]: 201 characters"),
    (json.dumps({"questions": ["x" * 150] * 40}).encode(), 413, "larger than 4096 bytes"),
    (b'{"questions": ["ok", "a \\ud800 b"]}', 422, "questions[1]: not valid Unicode (U+D800"),
    (json.dumps({"questions": ["tab\tand\nline", "bell\u0007"]}).encode(), 422,
     "questions[1]: control character U+0007"),
    (json.dumps({"questions": ["ok", "a " * 60]}).encode(), 413, "longer than 50 tokens questions[1]: 60 tokens"),
])
def test_bad_requests_get_clear_json_errors(service, body, status, needle):
    got, payload, _ = call(service.url, "/v1/answer", body)
    assert got == status, payload
    err = payload["error"]
    assert err["status"] == status
    assert needle in err["message"] + " " + " ".join(err.get("problems", []))


def test_unknown_paths_and_methods(service):
    assert call(service.url, "/v2/answer", {"questions": ["a"]})[0] == 404
    status, body, _ = call(service.url, "/v1/answer", method="GET")
    assert status == 405 and body["error"]["status"] == 405


def test_openapi_schema_describes_the_api(service):
    status, schema, _ = call(service.url, "/openapi.json")
    assert status == 200 and schema["openapi"].startswith("3.")
    post = schema["paths"]["/v1/answer"]["post"]
    assert {"200", "400", "413", "422", "503"} <= set(post["responses"])
    req = schema["components"]["schemas"]["AnswerRequest"]
    assert req["required"] == ["questions"] and req["additionalProperties"] is False
    assert req["properties"]["questions"]["items"]["type"] == "string"
    assert "AnswerResponse" in schema["components"]["schemas"] and "/health" in schema["paths"]
    assert openapi_schema()["paths"].keys() == schema["paths"].keys()


def test_a_full_queue_answers_503_with_retry_after(model):
    gate, entered = threading.Event(), threading.Event()
    answer_rows, info = model_answerer(model, ServiceConfig())

    def held(questions, explain, asks):  # the real answers, after the test lets the pass run
        entered.set()
        gate.wait(60)
        return answer_rows(questions, explain, asks)

    cfg = ServiceConfig(port=0, max_batch_size=2, max_questions=2, max_queue=2, max_wait_ms=0)
    with BackgroundService(held, cfg, info) as svc, ThreadPoolExecutor(4) as ex:
        first = ex.submit(call, svc.url, "/v1/answer", {"questions": [UNRELATED[0]]})
        assert entered.wait(30)
        second = ex.submit(call, svc.url, "/v1/answer", {"questions": list(UNRELATED[1:3])})
        while svc.batcher.waiting < 2:  # the second request is queued
            time.sleep(0.01)
        status, body, headers = call(svc.url, "/v1/answer", {"questions": [UNRELATED[0]]})
        assert status == 503 and "busy" in body["error"]["message"] and headers.get("retry-after") == "1"
        gate.set()
        assert first.result(60)[0] == 200 and second.result(60)[0] == 200
        assert call(svc.url, "/health")[1]["batching"]["rejected"] == 1


def test_a_failing_request_gets_a_generic_500_alone_and_the_details_go_to_the_log(model, caplog):
    answer_rows, info = model_answerer(model, ServiceConfig())
    gate, entered = threading.Event(), threading.Event()

    def picky(questions, explain, asks):
        entered.set()
        gate.wait(60)
        if "explode" in questions:
            raise RuntimeError("cannot answer that")
        return answer_rows(questions, explain, asks)

    caplog.set_level(logging.INFO, logger="meg")
    cfg = ServiceConfig(port=0, max_wait_ms=0, max_batch_size=8, max_questions=8)
    with BackgroundService(picky, cfg, info) as svc, ThreadPoolExecutor(4) as ex:
        first = ex.submit(call, svc.url, "/v1/answer", {"questions": [UNRELATED[0]]})
        assert entered.wait(30)  # the first pass is held: the next three requests queue up for one pass
        good = ex.submit(call, svc.url, "/v1/answer", {"questions": list(UNRELATED[1:3])})
        bad = ex.submit(call, svc.url, "/v1/answer", {"questions": ["explode"]})
        good2 = ex.submit(call, svc.url, "/v1/answer", {"questions": [UNRELATED[0]]})
        while svc.batcher.waiting < 4:
            time.sleep(0.01)
        gate.set()
        assert first.result(60)[0] == 200 and good.result(60)[0] == 200 and good2.result(60)[0] == 200
        status, body, headers = bad.result(60)
        assert good.result()[1]["answers"] == model.answer(list(UNRELATED[1:3]))["answers"]  # as if alone
        stats = call(svc.url, "/health")[1]["batching"]
    rid = headers["x-request-id"]
    assert status == 500 and body["error"]["message"] == f"internal error (request id {rid})"
    assert "cannot answer that" not in json.dumps(body)
    assert stats["failed_passes"] == 1 and stats["failed_requests"] == 1  # the pass of three, then one by one
    failures = [r for r in caplog.records if r.name == "meg.service" and rid in r.getMessage()]
    assert failures and "cannot answer that" in failures[0].getMessage() and failures[0].exc_info


def test_service_config_is_checked():
    with pytest.raises(ConfigError, match="'max_questions'"):
        ServiceConfig(max_questions=64, max_batch_size=32)
    with pytest.raises(ConfigError, match="'port'"):
        ServiceConfig(port=70000)
    with pytest.raises(ConfigError, match="'max_chars'"):
        ServiceConfig(max_chars=0)
    with pytest.raises(ConfigError, match="'max_queue'"):
        ServiceConfig(max_queue=4)
