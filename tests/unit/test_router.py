"""Routers on synthetic clustered embeddings: routing, calibration, persistence, config checks."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from meg.errors import ConfigError
from meg.router import (
    Calibration,
    FamiliarityRouter,
    NearestEditRouter,
    PseudoEdits,
    RouterConfig,
    build_router,
    calibrate_router,
    choose_cut,
    load_router,
    make_router,
    nearest_cosine,
)

D = 32
FAST = {"lr": 3e-3, "batch_size": 64, "blocks": 2}  # a smaller familiarity network: same logic, faster


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def clusters(n: int, seed: int, noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """n random unit 'edit' embeddings and one nearby 'paraphrase' embedding each."""
    g = torch.Generator().manual_seed(seed)
    centres = unit(torch.randn(n, D, generator=g))
    return centres, unit(centres + noise * unit(torch.randn(n, D, generator=g)))


def far(n: int, seed: int) -> torch.Tensor:
    return unit(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)))


class TableEncoder:
    """encode(texts) for synthetic texts: a fixed vector per text; records every text it is asked for."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table, self.seen = table, []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.seen += list(texts)
        return torch.stack([self.table[t] for t in texts]) if texts else torch.zeros(0, D)


def synthetic_pseudo(n: int, seed: int) -> tuple[PseudoEdits, TableEncoder]:
    edits, paras = clusters(n, seed)
    unrelated = far(3 * n, seed + 1000)
    table = {f"p{i}": edits[i] for i in range(n)} | {f"q{i}": paras[i] for i in range(n)}
    table |= {f"u{i}": unrelated[i] for i in range(3 * n)}
    pseudo = PseudoEdits(prompts=tuple(f"p{i}" for i in range(n)), paraphrases=tuple(f"q{i}" for i in range(n)),
                         unrelated=tuple(f"u{i}" for i in range(3 * n)))
    return pseudo, TableEncoder(table)


def test_nearest_router_routes_near_queries_to_their_edit():
    edits, paras = clusters(50, seed=0)
    router = NearestEditRouter(RouterConfig(kind="nearest", threshold=0.7)).fit(edits)
    mask, nearest, conf = router.route(paras)
    assert mask.all() and (nearest == torch.arange(50)).all() and (conf > 0.7).all()
    mask, _, _ = router.route(far(200, seed=1))
    assert not mask.any()


def test_nearest_cosine_chunks_agree_with_one_matmul():
    keys, queries = far(103, 0), far(17, 1)
    best, arg = nearest_cosine(queries, keys, chunk_size=10)
    ref = (queries @ keys.T).max(1)
    assert torch.allclose(best, ref.values) and (arg == ref.indices).all()


def test_familiarity_router_memorises_and_prefers_near_queries():
    edits, paras = clusters(40, seed=0)
    router = FamiliarityRouter(RouterConfig(kind="familiarity", **FAST)).fit(edits)
    assert router.memorised
    assert router.history[-1] < router.history[0]
    near, away = router.score(paras), router.score(far(200, seed=1))
    assert near.mean() > away.mean()
    assert (near <= 0).all() and (away >= -torch.log(torch.tensor(10.0)) - 1e-5).all()  # -entropy in [-ln K, 0]


def test_choose_cut_falls_between_separated_scores():
    pos, neg = torch.tensor([0.8, 0.9, 0.95]), torch.tensor([0.1, 0.3, 0.5])
    for objective in ("harmonic", "balanced"):
        cut, recall, rejection, edit_recall = choose_cut(pos, neg, objective)
        assert 0.5 < cut < 0.8 and recall == rejection == edit_recall == 1.0
    cut, recall, rejection, _ = choose_cut(torch.tensor([0.2, 0.9]), neg, target_recall=1.0)
    assert cut < 0.2 and recall == 1.0 and rejection == pytest.approx(1 / 3)


def test_choose_cut_keeps_the_edit_prompts_routed():
    pos, neg = torch.tensor([0.4, 0.6, 0.7]), torch.tensor([0.1, 0.2, 0.5])
    edit = torch.tensor([0.3, 0.9, 0.9, 0.9, 0.9])
    assert choose_cut(pos, neg)[0] == pytest.approx(0.55)  # paraphrases vs unrelated alone
    cut, recall, rejection, edit_recall = choose_cut(pos, neg, edit=edit)
    assert cut == pytest.approx(0.25) and edit_recall == 1.0 and rejection == pytest.approx(2 / 3)


def test_choose_cut_never_splits_tied_scores():
    cut, recall, rejection, _ = choose_cut(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, -1.0]))
    assert cut == pytest.approx(-0.5) and recall == 1.0 and rejection == 0.5


@pytest.mark.parametrize("kind", ["nearest", "familiarity"])
def test_calibrate_router_picks_threshold_between_clusters_and_transfers(kind):
    pseudo, encode = synthetic_pseudo(40, seed=10)
    config = RouterConfig(kind=kind, **FAST)
    cal = calibrate_router(config, encode, pseudo, n_edits=40)
    assert isinstance(cal, Calibration) and cal.n_edits == 40 and cal.n_probed == 40
    assert set(encode.seen) <= pseudo.texts()
    # the threshold transfers to a different edit set of the same size
    edits, paras = clusters(40, seed=20)
    router = make_router(RouterConfig(kind=kind, threshold=cal.threshold, **FAST)).fit(edits)
    conf = router.confusion(edits, paras, far(200, seed=21), torch.arange(40))
    if kind == "nearest":  # isotropic clusters separate perfectly by cosine
        assert cal.recall == cal.rejection == 1.0
        assert 0.38 < cal.threshold < 0.98  # between far max-cosines and paraphrase cosines
        assert conf["edit_routed"] == conf["paraphrase_routed_right"] == 1.0 and conf["unrelated_routed"] < 0.05
    else:  # the network is confident far from its edits too: only a margin, as in the paper
        assert cal.recall + cal.rejection > 1.2 and cal.threshold > 0
        assert conf["edit_routed"] > 0.5 and conf["paraphrase_routed"] - conf["unrelated_routed"] > 0.2


def test_calibration_api_takes_only_pseudo_edit_data():
    assert list(inspect.signature(calibrate_router).parameters) == [
        "config", "encode", "pseudo", "n_edits", "exclude", "target_recall"]
    assert list(inspect.signature(build_router).parameters) == [
        "config", "encode", "edit_prompts", "pseudo", "edit_subjects"]
    pseudo, encode = synthetic_pseudo(10, seed=0)
    with pytest.raises(ConfigError, match="overlap the edit set"):
        calibrate_router(RouterConfig(), encode, pseudo, 10, exclude=["p3"])
    with pytest.warns(UserWarning, match="calibrated on an edit set of 10"):
        assert calibrate_router(RouterConfig(), encode, pseudo, 20).n_edits == 10  # all there are, and said


def test_build_router_embeds_only_edit_prompts_and_pseudo_edits():
    pseudo, encode = synthetic_pseudo(30, seed=0)
    edits, _ = clusters(30, seed=5)
    encode.table |= {f"e{i}": edits[i] for i in range(30)}
    edit_prompts = [f"e{i}" for i in range(30)]
    router, cal = build_router(RouterConfig(kind="nearest"), encode, edit_prompts, pseudo)
    assert router.config.threshold == cal.threshold and router.n_edits == 30
    assert set(encode.seen) <= pseudo.texts() | set(edit_prompts)
    assert len(encode.seen) == len(set(encode.seen))  # each text embedded once (calibration reuses them)
    direct = calibrate_router(RouterConfig(kind="nearest"), encode, pseudo, 30, exclude=edit_prompts)
    assert direct == cal  # the same calibration as with repeated embedding
    given, none = build_router(RouterConfig(kind="nearest", threshold=0.5), encode, edit_prompts)
    assert none is None and given.config.threshold == 0.5


def test_calibration_pads_with_filler_to_the_edit_count():
    pseudo, encode = synthetic_pseudo(10, seed=0)
    filler, _ = clusters(15, seed=3)
    encode.table |= {f"f{i}": filler[i] for i in range(15)}
    pseudo = PseudoEdits(pseudo.prompts, pseudo.paraphrases, pseudo.unrelated, tuple(f"f{i}" for i in range(15)))
    cal = calibrate_router(RouterConfig(), encode, pseudo, n_edits=25)
    assert cal.n_edits == 25 and cal.n_probed == 10
    assert not {f"q{i}" for i in range(10)} - set(encode.seen)  # probed paraphrases used
    assert {t for t in encode.seen if t.startswith("f")} == {f"f{i}" for i in range(15)}  # filler only fitted


@pytest.mark.parametrize("kind", ["nearest", "familiarity"])
def test_save_load_round_trip(kind, tmp_path):
    edits, paras = clusters(20, seed=0)
    router = make_router(RouterConfig(kind=kind, threshold=0.5, **FAST)).fit(edits)
    router.save(tmp_path / "r")
    again = load_router(tmp_path / "r")
    assert type(again) is type(router) and again.config == router.config
    queries = torch.cat([paras, far(30, seed=2)])
    for a, b in zip(router.route(queries), again.route(queries)):
        assert torch.equal(a, b)


def test_route_needs_fit_and_threshold():
    with pytest.raises(ConfigError, match="not fitted"):
        NearestEditRouter(RouterConfig(threshold=0.5)).route(far(2, 0))
    with pytest.raises(ConfigError, match="threshold"):
        NearestEditRouter().fit(far(3, 0)).route(far(2, 0))
    with pytest.raises(ConfigError, match="kind"):
        FamiliarityRouter(RouterConfig(kind="nearest"))


@pytest.mark.parametrize(
    "field, value",
    [("kind", "knn"), ("objective", "f1"), ("threshold", float("nan")), ("num_labels", 1), ("blocks", 0),
     ("dropout", 1.0), ("lr", 0.0), ("stop_loss", -1.0), ("chunk_size", 0), ("device", "nope")],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        RouterConfig(**{field: value})


def test_familiarity_gives_repeated_prompts_one_label():
    edits, _ = clusters(12, seed=0)
    twice = torch.cat([edits, edits[:4] + 1e-7])  # the same prompts again, embedded in another batch
    router = FamiliarityRouter(RouterConfig(kind="familiarity", **FAST)).fit(twice)
    assert torch.equal(router.labels[12:], router.labels[:4])
    assert router.memorised and len(router.history) < router.config.max_epochs


def test_subject_index_matches_whole_words_case_and_punctuation_free():
    from meg.subject_gate import SubjectIndex

    index = SubjectIndex(["Lyon", "Danielle Darrieux", None, "Paul", "danielle darrieux", ""])
    assert index.free == [2, 5]
    assert index.matches("People in Lyon's twin city speak") == [0]
    assert index.matches("Where DANIELLE  Darrieux is from") == [1, 4]
    assert index.matches("Pauline and Lyonnais are not named") == []
    assert index.matches("Paul, Lyon") == [0, 3]


def gated_setup():
    """Three edits with subjects A, B and none; unit vectors e0, e1, e2."""
    emb = torch.eye(3, 8)
    config = RouterConfig(kind="nearest", threshold=0.5, subject_gate=True)
    return make_router(config).fit(emb, ["Alpha Corp", "Beta", None]), emb


def test_subject_gate_routes_only_to_named_edits():
    router, emb = gated_setup()
    near_e0 = F.normalize(emb[0] + 0.3 * emb[1], dim=0)
    q = torch.stack([near_e0, near_e0, near_e0, emb[2]])
    texts = ["what does Alpha Corp make", "what does beta make", "what does gamma make", "anything at all"]
    mask, nearest, _ = router.route(q, texts)
    assert mask.tolist() == [True, False, False, True]  # Beta is named but too far; gamma names nothing
    assert nearest[0] == 0 and nearest[3] == 2
    ungated = make_router(RouterConfig(kind="nearest", threshold=0.5)).fit(emb)
    assert ungated.route(q)[0].tolist() == [True, True, True, True]  # without the gate all four route
    with pytest.raises(ConfigError, match="text of every query"):
        router.route(q)


def test_subject_gate_needs_subjects_and_survives_save_load(tmp_path):
    with pytest.raises(ConfigError, match="subject of every edit"):
        make_router(RouterConfig(kind="nearest", subject_gate=True)).fit(torch.eye(2, 4))
    router, emb = gated_setup()
    router.save(tmp_path / "r")
    again = load_router(tmp_path / "r")
    q, texts = torch.stack([emb[0], emb[1]]), ["Alpha Corp?", "nobody"]
    assert again.subjects == ["Alpha Corp", "Beta", None]
    assert torch.equal(again.route(q, texts)[0], router.route(q, texts)[0])


def test_calibration_with_the_gate_rejects_same_subject_other_relation():
    """Negatives naming a pseudo-edit's subject keep the threshold above 'any query naming it'."""
    n = 30
    edits, paras = clusters(n, seed=3)
    others, unrelated = far(n, seed=4), far(3 * n, seed=5)
    table = {f"p{i} subj{i}": edits[i] for i in range(n)} | {f"q{i} subj{i}": paras[i] for i in range(n)}
    table |= {f"s{i} subj{i}": others[i] for i in range(n)} | {f"u{i}": unrelated[i] for i in range(3 * n)}
    pseudo = PseudoEdits(
        prompts=tuple(f"p{i} subj{i}" for i in range(n)), paraphrases=tuple(f"q{i} subj{i}" for i in range(n)),
        unrelated=tuple(f"u{i}" for i in range(3 * n)), subjects=tuple(f"subj{i}" for i in range(n)),
        same_subject=tuple(f"s{i} subj{i}" for i in range(n)),
    )
    cal = calibrate_router(RouterConfig(kind="nearest", subject_gate=True), TableEncoder(table), pseudo, n_edits=n)
    assert cal.recall == 1.0 and cal.n_unrelated == 4 * n
    assert cal.confusion["unrelated_routed"] == 0.0 and cal.confusion["same_subject_routed"] < 0.1
    assert cal.threshold > 0.3  # not "route whatever names a subject"


def test_choose_cut_weighs_kinds_of_negatives_alike():
    """Per kind, a small hard kind counts as much as a large easy one; pooled, it is drowned."""
    pos = torch.tensor([0.6, 0.7, 0.8, 0.9, 0.95, 0.97])
    easy, hard = torch.full((96,), -1.0), torch.tensor([0.5, 0.55, 0.62, 0.65])
    pooled = choose_cut(pos, torch.cat([easy, hard]))
    kinds = choose_cut(pos, [easy, hard])
    assert pooled[2] == pytest.approx(1 - sum(float(h) > pooled[0] for h in hard) / 100)
    assert kinds[2] == pytest.approx(1 - 0.5 * sum(float(h) > kinds[0] for h in hard) / 4)
    assert kinds[0] > pooled[0]  # the hard kind pushes the cut up only when it is not drowned
    with pytest.raises(ValueError):
        choose_cut(pos, [torch.zeros(0)])


def test_per_kind_calibration_keeps_same_subject_negatives_of_fitted_subjects_only():
    """The mix of negatives does not move with the edit count: questions on the subjects of pseudo-edits
    outside the fitted set are left out (they would be easy), and each kind weighs alike."""
    n = 40
    edits, paras = clusters(n, seed=7)
    others, unrelated = far(n, seed=8), far(3 * n, seed=9)
    table = {f"p{i}": edits[i] for i in range(n)} | {f"q{i}": paras[i] for i in range(n)}
    table |= {f"s{i}": others[i] for i in range(n)} | {f"u{i}": unrelated[i] for i in range(3 * n)}
    pseudo = PseudoEdits(prompts=tuple(f"p{i}" for i in range(n)), paraphrases=tuple(f"q{i}" for i in range(n)),
                         unrelated=tuple(f"u{i}" for i in range(3 * n)),
                         same_subject=tuple(f"s{i}" for i in range(n)), same_subject_of=tuple(range(n)))
    pooled = calibrate_router(RouterConfig(negatives="pooled"), TableEncoder(table), pseudo, n_edits=10)
    kinds = calibrate_router(RouterConfig(negatives="per_kind"), TableEncoder(table), pseudo, n_edits=10)
    assert pooled.n_unrelated == 3 * n + n and kinds.n_unrelated == 3 * n + 10
    with pytest.raises(ConfigError, match="same-subject"):
        PseudoEdits(prompts=("p0",), paraphrases=("q0",), unrelated=("u0",), same_subject=("s0",), same_subject_of=(3,))
    with pytest.raises(ConfigError, match="negatives"):
        RouterConfig(negatives="mixed")
