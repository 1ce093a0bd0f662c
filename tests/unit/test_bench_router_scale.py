"""bench.router_scale: router settings compared on held-out pseudo-edits, no language model."""

import json

SMALL = "n_pseudo_encoder=40,n_pseudo_calibration=40,encoder.trainable=none"


def run(tmp_path, monkeypatch, sizes: str, *variants: str) -> list[dict]:
    """bench.router_scale on a small pool with a frozen encoder: its rows."""
    from bench.router_scale import main

    monkeypatch.setenv("MEG_HOME", str(tmp_path / "home"))
    out = tmp_path / "rs.json"
    args = ["--sizes", sizes, "--set", SMALL, "--asked", "25", "--out", str(out)]
    assert main(args + [a for v in variants for a in ("--variant", v)]) == 0
    return json.loads(out.read_text())


def test_router_scale_reports_shares_and_a_dev_score_per_variant_and_size(tmp_path, monkeypatch):
    rows = run(tmp_path, monkeypatch, "20,30", "pooled:router_options.negatives=pooled", "kinds:")
    assert [(r["variant"], r["n"]) for r in rows] == [("pooled", 20), ("pooled", 30), ("kinds", 20), ("kinds", 30)]
    for r in rows:
        assert 0 <= r["paraphrase_right"] <= r["paraphrase_routed"] <= 100
        assert 0 <= r["locality_routed"] <= 100 and 0 <= r["same_subject_routed"] <= 100
        parts = (r["paraphrase_right"], 100 - r["locality_routed"], 100 - r["same_subject_routed"])
        assert min(parts) <= r["dev_score"] <= max(parts)
    # a frozen encoder still separates the paraphrases of 20 pseudo-edits from unrelated prompts
    assert rows[0]["paraphrase_right"] > 50 and rows[0]["locality_routed"] < 50


def test_relation_check_variant_calibrates_a_cut_no_worse_on_its_own_objective(tmp_path, monkeypatch):
    from bench.router_scale import harmonic

    plain, check = run(tmp_path, monkeypatch, "30", "plain:router_options.relation_check=false", "check:")
    assert plain["relation_cut"] is None and isinstance(check["relation_cut"], float)

    def objective(r: dict) -> float:  # what calibration maximises (harmonic objective)
        return harmonic(r["calibration_recall"], r["calibration_rejection"], r["calibration_edit_recall"])

    # the joint choice includes the threshold alone (a relation cut below every cosine), so it cannot do worse
    assert objective(check) >= objective(plain) - 1e-9
    assert 0 <= check["same_subject_routed"] <= 100 and 0 <= check["paraphrase_right"] <= check["paraphrase_routed"]
