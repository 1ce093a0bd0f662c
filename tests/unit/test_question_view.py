"""Questions asked after other context: the router embeds the question itself, the relation check compares it.

People (and a seventh of CounterFact's paraphrases) put a sentence of other context before the question
("Research shows mixed results. Edwin of Northumbria is affiliated with the religion"). The whole text's
embedding drifts away from the edit; ``question_view`` mixes in the embedding of the question alone, cut at the
sentence that names an edit's subject last, and ``relation_scope: sentence`` leaves the context out of the
relation check.
"""

from __future__ import annotations

import pytest
import torch

from meg.editor import leading_context
from meg.errors import ConfigError
from meg.router import NearestEditRouter, RouterConfig
from meg.subject_gate import mask_subject, question_start
from tests.unit.test_router_relation import BagEncoder, q

CONTEXT = " ".join(f"w9{k}" for k in range(8)) + "."  # words that weigh as much as the wording


def test_question_start_is_the_sentence_naming_the_subject_last():
    text = "I read about Lyon. It was nice. What is Lyon's twin city?"
    assert text[question_start(text, "Lyon"):] == "What is Lyon's twin city?"
    assert question_start("Lyon is in", "Lyon") == 0
    assert question_start("Paris is in", "Lyon") is None
    assert question_start("Lyon is in", None) is None


def test_mask_subject_last_sentence_leaves_the_context_out():
    text = "Regarding supplements, research shows mixed results. Edwin of Northumbria is affiliated with the religion"
    assert mask_subject(text, "Edwin of Northumbria", "it", last_sentence=True) == "it is affiliated with the religion"
    assert mask_subject(text, "Edwin of Northumbria", "it").startswith("Regarding supplements")
    # a subject with a full stop inside is one name, not two sentences
    assert mask_subject("Who wrote it? J. R. R. Tolkien wrote in", "J. R. R. Tolkien", "X", True) == "X wrote in"


def test_leading_context_is_what_comes_before_the_question():
    assert leading_context("Mixed results. Edwin of Northumbria is affiliated with", "Edwin of Northumbria") == (
        "Mixed results.")
    assert leading_context("Edwin of Northumbria is affiliated with", "Edwin of Northumbria") == ""
    assert leading_context("Nobody named here.", "Edwin of Northumbria") == ""


def router(question_view: float, threshold: float = 0.75) -> tuple[NearestEditRouter, BagEncoder]:
    enc = BagEncoder()
    prompts = [q("capital", s, 0) for s in range(8)]
    r = NearestEditRouter(RouterConfig(threshold=threshold, question_view=question_view))
    r.fit(enc(prompts), [f"Subj{s}" for s in range(8)], prompts, enc)
    return r, enc


def test_question_view_brings_a_question_after_context_back_to_its_edit():
    asked = f"{CONTEXT} {q('capital', 3, 1)}"
    plain, enc = router(0.0)
    viewed, _ = router(0.5)
    before = plain.route_detail(enc([asked]), [asked], enc)
    after = viewed.route_detail(enc([asked]), [asked], enc)
    assert not before.mask[0]  # the context outweighs the question
    assert after.mask[0] and int(after.nearest[0]) == 3
    assert after.confidence[0] > before.confidence[0]


def test_question_view_leaves_other_queries_as_they_are():
    viewed, enc = router(0.5)
    texts = [q("capital", 3, 1), f"{CONTEXT} capital of Nobody w1", f"{CONTEXT} {q('capital', 3, 1)}"]
    emb = enc(texts)
    out = viewed.query_embeddings(emb, texts, enc)
    assert torch.allclose(out[:2], emb[:2], atol=1e-6)  # no context; no edit's subject named
    assert not torch.allclose(out[2], emb[2], atol=1e-3)
    assert viewed.question_views(texts) == [None, None, q("capital", 3, 1)]
    assert torch.equal(viewed.query_embeddings(emb, texts, None), emb)  # no encoder: nothing to mix in


@pytest.mark.parametrize("value", [-0.1, 1.5, "half"])
def test_question_view_outside_0_1_is_refused(value):
    with pytest.raises(ConfigError, match="question_view"):
        RouterConfig(question_view=value)


def test_relation_scope_must_be_known():
    with pytest.raises(ConfigError, match="relation_scope"):
        RouterConfig(relation_scope="paragraph")


class _Rewordings:
    """What ``with_rewordings`` needs of ``meg.rewrite.Rewordings``: every own paraphrase blocked, one rewording."""

    class blocklist:  # noqa: N801 - stands for a Blocklist instance
        @staticmethod
        def blocks_rewording(text, subject):
            return True

    def prepare(self, items):
        list(items)

    def of(self, prompt, subject, n, answers=()):
        return [f"What is {subject} known for?"]


def test_pseudo_edit_paraphrases_keep_their_context_in_front_of_the_rewording():
    from meg.editor import with_rewordings
    from meg.facts import EditRequest

    pool = [EditRequest(id="a", prompt="Ann Lee works as", target_new="nurse", subject="Ann Lee",
                        paraphrases=("Mixed results, says research. Ann Lee's job is",)),
            EditRequest(id="b", prompt="Bo Chan works as", target_new="cook", subject="Bo Chan",
                        paraphrases=("Bo Chan's job is",))]
    kept = with_rewordings(pool, _Rewordings(), keep_context=True)
    assert [e.paraphrases[0] for e in kept] == ["Mixed results, says research. What is Ann Lee known for?",
                                               "What is Bo Chan known for?"]
    plain = with_rewordings(pool, _Rewordings())
    assert [e.paraphrases[0] for e in plain] == ["What is Ann Lee known for?", "What is Bo Chan known for?"]
