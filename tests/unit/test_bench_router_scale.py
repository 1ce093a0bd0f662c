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
