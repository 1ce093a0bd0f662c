"""bench.router_scale: router settings compared on held-out pseudo-edits, no language model."""

import json


def test_router_scale_reports_shares_and_a_dev_score_per_variant_and_size(tmp_path, monkeypatch):
    from bench.router_scale import main

    monkeypatch.setenv("MEG_HOME", str(tmp_path / "home"))
    out = tmp_path / "rs.json"
    small = "n_pseudo_encoder=40,n_pseudo_calibration=40,encoder.trainable=none"
    assert main(["--sizes", "20,30", "--set", small, "--asked", "25", "--out", str(out),
                 "--variant", "pooled:", "--variant", "kinds:router_options.negatives=per_kind"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["n"]) for r in rows] == [("pooled", 20), ("pooled", 30), ("kinds", 20), ("kinds", 30)]
    for r in rows:
        assert 0 <= r["paraphrase_right"] <= r["paraphrase_routed"] <= 100
        assert 0 <= r["locality_routed"] <= 100 and 0 <= r["same_subject_routed"] <= 100
        parts = (r["paraphrase_right"], 100 - r["locality_routed"], 100 - r["same_subject_routed"])
        assert min(parts) <= r["dev_score"] <= max(parts)
    # a frozen encoder still separates the paraphrases of 20 pseudo-edits from unrelated prompts
    assert rows[0]["paraphrase_right"] > 50 and rows[0]["locality_routed"] < 50


def test_without_subject_replaces_every_case_folded_occurrence_and_refuses_texts_that_name_none():
    from bench.router_scale import without_subject

    assert without_subject("Paris is the capital; paris, they say", "Paris", "it") == "it is the capital; it, they say"
    assert without_subject("The twin city of Lyon is", "Paris", "it") is None
    assert without_subject("anything", None, "it") is None


def test_relation_check_cuts_keep_their_share_of_paraphrases_and_only_remove_routed_questions(tmp_path, monkeypatch):
    from bench.router_scale import KEEP, main

    monkeypatch.setenv("MEG_HOME", str(tmp_path / "home"))
    out = tmp_path / "rc.json"
    small = "n_pseudo_encoder=40,n_pseudo_calibration=40,encoder.trainable=none"
    assert main(["--sizes", "20,30", "--set", small, "--asked", "25", "--out", str(out),
                 "--relation-check", "it,X"]) == 0
    rows = json.loads(out.read_text())
    for r in rows:
        assert set(r["relation_check"]) == {"it", "X"}
        for after in r["relation_check"].values():
            cuts = [after[str(keep)]["cut"] for keep in KEEP]
            assert cuts == sorted(cuts)  # keeping fewer paraphrases is a higher cut
            for keep in KEEP:
                a = after[str(keep)]
                assert a["paraphrase_right"] <= r["paraphrase_right"]
                assert a["locality_routed"] <= r["locality_routed"]
                assert a["same_subject_routed"] <= r["same_subject_routed"]
                # the cut was taken on these paraphrases: it drops at most its share of the named ones (+1 tie)
                dropped = round((r["paraphrase_right"] - a["paraphrase_right"]) * 25 / 100)  # 25 asked, each with one
                assert dropped <= (1 - keep) * a["paraphrase_right_named"] + 1
                assert min(a["paraphrase_right"], 100 - a["locality_routed"], 100 - a["same_subject_routed"]) \
                    <= a["dev_score"] <= max(a["paraphrase_right"], 100 - a["locality_routed"],
                                             100 - a["same_subject_routed"])
