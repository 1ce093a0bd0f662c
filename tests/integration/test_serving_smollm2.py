"""The service on a real SmolLM2-135M bundle: edited, paraphrased and unrelated questions over HTTP.

16 CounterFact edits, a briefly tuned encoder and a short generator run (a few minutes on 2 CPU
cores): smaller than a real build, but every part is the real one.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from meg.evaluate import normalise_answer
from meg.generation import states
from tests.unit.test_service import call

pytestmark = pytest.mark.integration
N_EDITS = 16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, smollm2):
    from meg import editor, fit
    from meg.bundle import record_edits
    from meg.facts import load_benchmark

    edits = load_benchmark("counterfact", "edit")[:N_EDITS]
    fitting = editor.MegConfig().fit  # the defaults: rewordings, prefixes and chat contexts
    cfg = editor.MegConfig(fit=fitting, n_pseudo_encoder=1024, n_pseudo_calibration=512,
                           encoder={"max_steps": 16}, generator={"max_steps": 600}, weights="generator")
    model = editor.build(smollm2, edits, cfg, progress=False)
    record_edits(model, edits)
    return model, edits


@pytest.fixture(scope="module")
def service(bundle):
    from meg.service import BackgroundService, ServiceConfig, model_answerer

    cfg = ServiceConfig(port=0, max_wait_ms=20, max_questions=16, max_batch_size=32)
    answer_rows, info = model_answerer(bundle[0], cfg)
    with BackgroundService(answer_rows, cfg, info) as svc:
        yield svc


def ask(svc, questions, explain=False):
    status, body, _ = call(svc.url, "/v1/answer", {"questions": questions, "explain": explain})
    assert status == 200, body
    return body


def test_edited_paraphrased_and_unrelated_questions(service, bundle):
    """Asked as chat turns (the service's default for an instruct model): the answers state the new facts."""
    _, edits = bundle
    rel = ask(service, [e.prompt for e in edits], explain=True)
    gen = ask(service, [e.paraphrases[0] for e in edits], explain=True)
    loc = ask(service, [e.locality[0].prompt for e in edits], explain=True)
    rel_ok = sum(states(a, e.target_new) for a, e in zip(rel["answers"], edits))
    gen_ok = sum(states(a, e.target_new) for a, e in zip(gen["answers"], edits))
    base_gen_ok = sum(states(x["base_answer"], e.target_new) for x, e in zip(gen["explanations"], edits))
    repeats = sum(a.casefold().count(e.target_new.casefold()) >= 3 for a, e in zip(rel["answers"], edits))
    print(f"edit prompts {rel_ok}/{N_EDITS}, paraphrases {gen_ok}/{N_EDITS} (base {base_gen_ok})")
    assert rel_ok >= 0.75 * N_EDITS
    assert gen_ok > base_gen_ok  # paraphrases the model never saw move towards the new facts
    assert repeats <= N_EDITS // 4  # an answer, not the target repeated to the token limit
    unrouted = [x for x in loc["explanations"] if not x["routed"]]
    assert len(unrouted) >= 0.75 * N_EDITS
    assert all(x["answer"] == x["base_answer"] for x in unrouted)  # unrelated: the base model, unchanged
    for x, e in zip(rel["explanations"], edits):
        assert x["routed"] and x["nearest_edits"][0]["id"] == e.id
    model = bundle[0]  # completing raw text (--raw) still gives the first line's exact target
    raw = model.answer([e.prompt for e in edits], chat=False)["answers"]
    assert sum(normalise_answer(a) == normalise_answer(e.target_new) for a, e in zip(raw, edits)) >= 0.75 * N_EDITS


def test_concurrent_clients_get_the_sequential_answers(service, bundle):
    _, edits = bundle
    questions = [e.prompt for e in edits[:6]] + [e.paraphrases[0] for e in edits[:5]] + \
        [e.locality[0].prompt for e in edits[:5]]
    sequential = [ask(service, [q])["answers"][0] for q in questions]
    barrier = threading.Barrier(len(questions))

    def one(q):
        barrier.wait(60)
        return ask(service, [q])["answers"][0]

    with ThreadPoolExecutor(len(questions)) as ex:
        assert list(ex.map(one, questions)) == sequential


def test_openai_client_gets_the_edited_facts_and_the_base_model_elsewhere(service, bundle):
    """Through the official openai client: a chat turn asking an edited fact states the new target (streamed or
    not, the same text as /v1/answer); an unrelated question gets the base model's answer; a raw completion of
    an edit prompt starts with the target."""
    openai = pytest.importorskip("openai")
    model, edits = bundle
    client = openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    rel = ask(service, [e.prompt for e in edits[:6]])["answers"]
    hit = next(i for i, (a, e) in enumerate(zip(rel, edits)) if states(a, e.target_new))
    edit = edits[hit]
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": edit.prompt}]
    got = client.chat.completions.create(model="meg", messages=messages)
    assert states(got.choices[0].message.content, edit.target_new)
    assert got.usage.prompt_tokens > 0 and got.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="meg", messages=[{"role": "user", "content": edit.prompt}],
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == rel[hit]  # the same answer path as /v1/answer
    loc = ask(service, [e.locality[0].prompt for e in edits[:6]], explain=True)["explanations"]
    other = next(x for x in loc if not x["routed"])
    plain = client.chat.completions.create(model="meg", messages=[{"role": "user", "content": other["question"]}])
    assert plain.choices[0].message.content == other["base_answer"]  # the base model's answer, unchanged
    raw = model.answer([e.prompt for e in edits[:6]], chat=False)["answers"]
    exact = next(i for i, (a, e) in enumerate(zip(raw, edits)) if normalise_answer(a) == normalise_answer(e.target_new))
    done = client.completions.create(model="meg", prompt=edits[exact].prompt, max_tokens=8, stop=["\n"])
    assert done.choices[0].text.strip().startswith(edits[exact].target_new)
