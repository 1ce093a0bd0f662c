"""The router's relation check: a routed question naming its edit's subject but asking another relation goes back.

Texts are synthetic ("capital of Subj3 w1"); a bag-of-words encoder weighs the subject word most, as the
trained encoder does, so a question on another relation of an edited subject is closer to that edit than any
paraphrase-free negative, and only the subject-masked comparison tells the relations apart.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from meg.errors import BundleError, ConfigError
from meg.router import (
    NearestEditRouter,
    PseudoEdits,
    RouterConfig,
    build_router,
    calibrate_router,
    choose_cut,
    choose_cuts,
    load_router,
    relation_scores,
)
from meg.subject_gate import mask_subject

D = 256
RELATIONS = ("capital", "currency", "anthem", "leader", "language", "climate")
WEIGHT = {"subj": 3.0, "rel": 1.0, "w": 1.0}  # subject words dominate the full question


def word_vector(word: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
    return torch.randn(D, generator=g)


class BagEncoder:
    """encode(texts): the weighted sum of fixed random word vectors, normalised; counts the texts it embeds."""

    def __init__(self):
        self.calls = 0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls += len(texts)
        rows = []
        for text in texts:
            v = torch.zeros(D)
            for w in text.split():
                kind = "subj" if w.startswith("Subj") else "w" if w.startswith("w") else "rel" if w in RELATIONS else None
                v += WEIGHT[kind] * word_vector(w) if kind else 0.3 * word_vector(w)
            rows.append(v)
        return F.normalize(torch.stack(rows), dim=-1) if rows else torch.zeros(0, D)


def q(rel: str, s: int, w: int, extra: int = 0) -> str:
    """A question on relation ``rel`` of subject ``s`` in wording ``w``, with ``extra`` more wording words."""
    return " ".join([rel, "of", f"Subj{s}", f"w{w}", *(f"w{w}{k}" for k in range(extra))])


def pseudo_set(n: int, offset: int) -> PseudoEdits:
    """n pseudo-edits: prompt and paraphrase ask one relation of a subject (other wording), same-subject
    questions ask the next relation, unrelated prompts ask the same relation of other subjects."""
    rel = [RELATIONS[i % 3] for i in range(n)]
    s = [offset + i for i in range(n)]
    return PseudoEdits(
        prompts=tuple(q(r, x, 0) for r, x in zip(rel, s)),
        paraphrases=tuple(q(r, x, 1, i % 4) for i, (r, x) in enumerate(zip(rel, s))),  # some far reworded
        unrelated=tuple(q(r, offset + 5000 + i, 0) for i, r in enumerate(rel)),
        subjects=tuple(f"Subj{x}" for x in s),
        same_subject=tuple(q(RELATIONS[3 + i % 3], x, 2) for i, x in enumerate(s)),
        same_subject_of=tuple(range(n)),
    )


def test_mask_subject_whole_words_any_case_and_punctuation():
    assert mask_subject("Lyon's twin city is", "Lyon", "it") == "it's twin city is"
    assert mask_subject("The mother tongue of danielle  DARRIEUX is", "Danielle Darrieux", "it") == (
        "The mother tongue of it is")
    assert mask_subject("Alabama is in", "Al", "it") is None  # not a whole word
    assert mask_subject("Jean-Paul Sartre, a", "Jean Paul Sartre", "X") == "X, a"
    assert mask_subject("anything", None, "it") is None and mask_subject("anything", " ", "it") is None
    assert mask_subject("Foo and foo", "Foo", "it") == "it and it"


def test_relation_check_sends_back_other_relations_of_the_subject_only():
    enc = BagEncoder()
    prompts = [q("capital", 1, 0), q("currency", 2, 0)]
    config = RouterConfig(kind="nearest", threshold=0.3, relation_check=True, relation_cut=0.3)
    router = NearestEditRouter(config).fit(enc(prompts), ["Subj1", "Subj2"], prompts, enc)
    texts = [q("capital", 1, 1), q("anthem", 1, 1), q("capital", 7, 1), "capital of w1"]
    plain = NearestEditRouter(RouterConfig(kind="nearest", threshold=0.3)).fit(enc(prompts))
    before, nearest, _ = plain.route(enc(texts), texts)
    assert before[:2].tolist() == [True, True]  # the subject alone routes the other relation too
    mask, nearest2, _ = router.route(enc(texts), texts, enc)
    assert (nearest2 == nearest).all()
    assert mask[0] and not mask[1]  # same relation kept, other relation of the subject sent back
    # a question that does not name its nearest edit's subject is left as the threshold routed it
    assert mask[2:].tolist() == before[2:].tolist()
    cos = router.relation_cosines(texts, nearest, torch.ones(4, dtype=torch.bool), enc)
    assert cos[0] > 0.3 > cos[1] and cos[2:].isnan().all()
    with pytest.raises(ConfigError, match="text of every query and the encoder"):
        router.route(enc(texts), texts)


def test_relation_check_config_and_fit_errors():
    with pytest.raises(ConfigError, match="relation_word"):
        RouterConfig(relation_word=" ")
    with pytest.raises(ConfigError, match="relation_cut"):
        RouterConfig(relation_cut=float("nan"))
    enc = BagEncoder()
    prompts = [q("capital", 1, 0)]
    with pytest.raises(ConfigError, match="edit prompts, their subjects and the encoder"):
        NearestEditRouter(RouterConfig(relation_check=True)).fit(enc(prompts), ["Subj1"])
    router = NearestEditRouter(RouterConfig(threshold=0.3, relation_check=True)).fit(enc(prompts), ["Subj1"], prompts,
                                                                                      enc)
    with pytest.raises(ConfigError, match="no relation_cut"):
        router.route(enc(prompts), prompts, enc)
    with pytest.raises(ConfigError, match="set both"):
        build_router(RouterConfig(threshold=0.3, relation_check=True), enc, prompts, None, ["Subj1"])


def test_calibration_chooses_a_cut_that_rejects_same_subject_questions():
    enc = BagEncoder()
    pseudo = pseudo_set(60, offset=0)
    without = calibrate_router(RouterConfig(kind="nearest"), enc, pseudo, 60)
    with_check = calibrate_router(RouterConfig(kind="nearest", relation_check=True), enc, pseudo, 60)
    assert without.relation_cut is None and with_check.relation_cut is not None
    assert without.confusion["same_subject_routed"] > 0.5  # the subject word carries them to the edit
    assert with_check.confusion["same_subject_routed"] < 0.1
    assert with_check.confusion["paraphrase_routed_right"] >= without.confusion["paraphrase_routed_right"] - 0.05
    assert with_check.rejection > without.rejection
    # the cut transfers: a router built on other edits with the calibrated cuts keeps what it found
    edits = pseudo_set(60, offset=100)
    router, cal = build_router(RouterConfig(kind="nearest", relation_check=True), enc, list(edits.prompts), pseudo,
                               list(edits.subjects))
    assert (router.config.threshold, router.config.relation_cut) == (cal.threshold, cal.relation_cut)
    same = list(edits.same_subject)
    para = list(edits.paraphrases)
    assert router.route(enc(same), same, enc)[0].float().mean() < 0.1
    assert router.route(enc(para), para, enc)[0].float().mean() > 0.9


def test_choose_cuts_loosens_the_threshold_when_the_check_pays():
    # paraphrases: two score well, two need a loose threshold; a same-subject negative scores between them,
    # and only the masked cosine sets it apart
    pos = (torch.tensor([0.9, 0.85, 0.5, 0.45]), torch.tensor([0.9, 0.8, 0.7, 0.75]))
    unrelated = (torch.tensor([0.1, 0.2, 0.3]), torch.full((3,), float("nan")))
    same = (torch.tensor([0.6, 0.65]), torch.tensor([0.1, 0.2]))
    first = choose_cut(pos[0], [unrelated[0], same[0]])
    assert first[0] > 0.65  # without the check the same-subject questions force a strict cut
    cut, rcut, recall, rejection, edit_recall = choose_cuts(pos, [unrelated, same])
    assert cut < 0.45 and 0.2 < rcut < 0.7 and recall == rejection == edit_recall == 1.0
    routed = relation_scores(pos[0], pos[1], cut) > rcut
    assert routed.all() and not (relation_scores(*same, cut) > rcut).any()


def test_relation_check_survives_save_load_and_is_checked(tmp_path):
    enc = BagEncoder()
    prompts = [q("capital", 1, 0), q("currency", 2, 0)]
    config = RouterConfig(kind="nearest", threshold=0.3, relation_check=True, relation_cut=0.3)
    router = NearestEditRouter(config).fit(enc(prompts), ["Subj1", "Subj2"], prompts, enc)
    router.save(tmp_path / "r")
    back = load_router(tmp_path / "r")
    texts = [q("capital", 1, 1), q("anthem", 1, 1)]
    assert torch.equal(back.masked_emb, router.masked_emb)
    assert back.route(enc(texts), texts, enc)[0].tolist() == router.route(enc(texts), texts, enc)[0].tolist()
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "r" / "router.safetensors"))
    del tensors["masked_emb"]
    save_file(tensors, str(tmp_path / "r" / "router.safetensors"))
    with pytest.raises(BundleError, match="masked prompt embedding"):
        load_router(tmp_path / "r")


def test_a_cut_just_below_a_score_routes_it_as_calibration_counted():
    # a float32 comparison would round the cut onto the score and drop exactly the paraphrase that was counted
    score = torch.tensor([0.8123456], dtype=torch.float32)
    router = NearestEditRouter(RouterConfig(kind="nearest", threshold=float(score.double()[0]) - 1e-9))
    router.fit(score.new_tensor([[1.0, 0.0]]))
    query = torch.stack([score, (1 - score**2).sqrt()], 1)  # cosine with the one edit = score
    assert router.route(query)[0].item()


def test_one_cut_set_without_the_other_is_refused_and_options_add_to_the_defaults():
    from meg.editor import ROUTER_DEFAULTS, MegConfig, with_overrides

    enc = BagEncoder()
    prompts = [q("capital", 1, 0)]
    for given in ({"threshold": 0.3}, {"relation_cut": 0.2}):
        with pytest.raises(ConfigError, match="set both, or neither"):
            build_router(RouterConfig(relation_check=True, **given), enc, prompts, pseudo_set(5, 50), ["Subj1"])
    assert MegConfig().router_options == ROUTER_DEFAULTS and ROUTER_DEFAULTS["relation_check"] is True
    assert MegConfig(router_options={"negatives": "pooled"}).router_options == {**ROUTER_DEFAULTS,
                                                                                 "negatives": "pooled"}
    off = with_overrides(MegConfig(), {"router_options.relation_check": False})
    assert off.router_options["relation_check"] is False


def test_fewer_pseudo_edits_than_edits_keep_their_subjects_for_the_check():
    pseudo = pseudo_set(8, offset=0)  # no filler: the calibration set is smaller than the edit set
    with pytest.warns(UserWarning, match="calibrated on an edit set of 8"):
        prompts, subjects, n_probe = pseudo.fitted(20)
    assert len(prompts) == n_probe == 8 and subjects == list(pseudo.subjects)
    with pytest.warns(UserWarning):
        cal = calibrate_router(RouterConfig(kind="nearest", relation_check=True), BagEncoder(), pseudo, 20)
    assert cal.relation_cut is not None


def test_route_detail_says_why_each_question_was_or_was_not_routed():
    from meg.router import NO_SUBJECT, RELATION, ROUTED, THRESHOLD

    enc = BagEncoder()
    prompts = [q("capital", 1, 0), q("currency", 2, 0)]
    config = RouterConfig(kind="nearest", threshold=0.3, relation_check=True, relation_cut=0.3, subject_gate=True)
    router = NearestEditRouter(config).fit(enc(prompts), ["Subj1", "Subj2"], prompts, enc)
    texts = [q("capital", 1, 1), q("anthem", 1, 1), q("capital", 7, 1)]
    r = router.route_detail(enc(texts), texts, enc)
    mask, nearest, conf = router.route(enc(texts), texts, enc)
    assert r.mask.tolist() == mask.tolist() and (r.nearest == nearest).all() and torch.equal(r.confidence, conf)
    assert r.reason == [ROUTED, RELATION, NO_SUBJECT]
    assert r.relation[0] > 0.3 > r.relation[1] and r.relation[2].isnan()
    # a stricter threshold sends the paraphrase back before the relation check looks at it
    router.config.threshold = float(router.scores(enc(texts[:1]), texts[:1])[0]) + 1e-3
    strict = router.route_detail(enc(texts), texts, enc)
    assert strict.reason[0] == THRESHOLD and strict.relation[0].isnan() and not strict.mask.any()
