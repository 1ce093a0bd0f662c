"""The EasyEdit-style API on the tiny model directory: metric shape, pre/post, sequential edits, save/load."""

from __future__ import annotations

import pytest

from meg.api import MegEditorAPI
from meg.errors import ConfigError
from tests.tiny_bundle import UNRELATED, tiny_config, tiny_edits, tiny_model_dir

N = 4


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    return MegEditorAPI.from_pretrained(model=str(tiny_model_dir()), config=tiny_config(),
                                        work_dir=tmp_path_factory.mktemp("api-work"), progress=False)


def request(edits):
    return dict(
        prompts=[e.prompt for e in edits],
        target_new=[e.target_new for e in edits],
        ground_truth=[e.target_old for e in edits],
        rephrase_prompts=[e.paraphrases[0] for e in edits],
        locality_inputs={"neighborhood": {"prompt": [e.locality[0].prompt for e in edits],
                                          "ground_truth": [e.locality[0].answer for e in edits]},
                         "unrelated": {"prompt": list(UNRELATED[:1]) * len(edits)}},
        subject=[e.subject for e in edits],
    )


@pytest.fixture(scope="module")
def first_edit(api):
    return api.edit(**request(tiny_edits()[:N]), verbose=False)


def test_metrics_have_easyedits_shape(first_edit):
    metrics, _ = first_edit
    edits = tiny_edits()[:N]
    assert [m["case_id"] for m in metrics] == list(range(N))
    for m, e in zip(metrics, edits):
        rr = m["requested_rewrite"]
        assert (rr["prompt"], rr["target_new"], rr["ground_truth"], rr["subject"]) == \
            (e.prompt, e.target_new, e.target_old, e.subject)
        assert rr["locality"]["neighborhood"]["ground_truth"] == e.locality[0].answer
        assert set(m["pre"]) == {"rewrite_acc", "rewrite_ag", "rephrase_acc", "rephrase_ag", "locality"}
        assert set(m["post"]) == {"rewrite_acc", "rewrite_ag", "rephrase_acc", "rephrase_ag", "locality", "routed"}
        assert set(m["pre"]["locality"]) == {"neighborhood_output", "unrelated_output"}
        assert set(m["post"]["locality"]) == {"neighborhood_acc", "neighborhood_ag", "unrelated_acc", "unrelated_ag"}
        for section in ("pre", "post"):
            for key in ("rewrite_acc", "rephrase_acc", "rewrite_ag"):
                assert len(m[section][key]) == 1 and 0.0 <= m[section][key][0] <= 1.0
        assert m["time"] > 0


def test_post_beats_pre_and_unrelated_prompts_are_untouched(first_edit):
    metrics, model = first_edit
    pre = sum(m["pre"]["rewrite_acc"][0] for m in metrics)
    post = sum(m["post"]["rewrite_acc"][0] for m in metrics)
    assert post > pre and post >= N / 2  # teacher-forced; the tiny model repeats targets, so AG is unreliable
    assert all(m["post"]["routed"] for m in metrics)
    # the unrelated probe is not routed, so its answer is the pre-edit answer token for token
    assert all(m["post"]["locality"]["unrelated_acc"] == [1.0] for m in metrics)
    base_answer = metrics[0]["pre"]["locality"]["unrelated_output"]
    assert model.generate([UNRELATED[0]])[0] == base_answer


def test_edited_model_generates_saves_and_loads(first_edit, tmp_path):
    from meg.editor import EditedModel

    _, model = first_edit
    tok = model.loaded.tokenizer
    enc = tok([tiny_edits()[2].prompt], return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=3)
    assert tok.decode(ids[0, enc.input_ids.shape[1]:]).startswith(" " + tiny_edits()[2].target_new)
    model.save(tmp_path / "b")
    again = EditedModel.load(tmp_path / "b")
    assert again.answer([e.prompt for e in tiny_edits()[:N]]) == model.answer([e.prompt for e in tiny_edits()[:N]])


def test_keep_original_weight(api, first_edit):
    edits = tiny_edits()
    _, alone = api.edit(prompts=[edits[N].prompt], target_new=[edits[N].target_new], verbose=False)
    assert alone.info["n_edits"] == 1  # True (default): this call's facts only
    _, seq1 = api.edit(**request(edits[:2]), keep_original_weight=False, verbose=False)
    metrics, seq2 = api.edit(**request(edits[2:N]), keep_original_weight=False, verbose=False)
    assert seq1.info["n_edits"] == 2 and seq2.info["n_edits"] == N  # False: facts accumulate
    assert len(metrics) == N - 2 and metrics[0]["requested_rewrite"]["prompt"] == edits[2].prompt
    _, mask, _, _ = seq2.route([e.prompt for e in edits[:N]])
    assert mask.all()  # the earlier facts are still edited in


def test_optional_inputs_and_errors(api):
    e = tiny_edits()[0]
    metrics, _ = api.edit(prompts=e.prompt, target_new=e.target_new, verbose=False)  # strings for one edit
    assert "rephrase_acc" not in metrics[0]["post"] and metrics[0]["post"]["locality"] == {}
    with pytest.raises(ConfigError, match="'target_new' has 1 entries, but there are 2 prompts"):
        api.edit(prompts=["a", "b"], target_new=["x"])
    with pytest.raises(ConfigError, match="'target_new'\\[1\\] must be a non-empty string"):
        api.edit(prompts=["a", "b"], target_new=["x", " "])
    with pytest.raises(ConfigError, match="locality_inputs\\['n'\\]"):
        api.edit(prompts=["a"], target_new=["x"], locality_inputs={"n": ["p"]})
    with pytest.raises(ConfigError, match="'prompts' is empty"):
        api.edit(prompts=[], target_new=[])
