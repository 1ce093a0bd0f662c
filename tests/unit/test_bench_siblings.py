"""bench.siblings: contradicting same-subject edits and ambiguous paraphrases (real base encoder)."""

import json

from meg.facts import EditRequest


def _edit(i, prompt, target, subject, para):
    return EditRequest(id=f"s-{i}", prompt=prompt, target_new=target, subject=subject, paraphrases=(para,))


EDITS = [
    # a paraphrase that is the sibling's prompt word for word
    _edit(0, "On which planet is Lacus Aestatis?", "Mars", "Lacus Aestatis", "What planet is Lacus Aestatis on?"),
    _edit(1, "What planet is Lacus Aestatis on?", "Ariel", "Lacus Aestatis", "Lacus Aestatis lies on which body?"),
    # same subject, same target: not contradicting
    _edit(2, "Who designed the Heroes Chronicles?", "Chris Riddell", "Heroes Chronicles", "Heroes Chronicles was designed by?"),
    _edit(3, "Who illustrated Heroes Chronicles?", "Chris Riddell", "Heroes Chronicles", "Heroes Chronicles was drawn by?"),
    # another subject altogether
    _edit(4, "What is the mother tongue of Danielle Darrieux?", "English", "Danielle Darrieux",
          "Danielle Darrieux's native language is?"),
]


def test_classify_finds_contradicting_siblings_and_ambiguous_paraphrases():
    from bench.siblings import classify
    from meg.editor import MegConfig, base_encoder

    kind = classify(EDITS, base_encoder(MegConfig()).encode)
    assert kind[0] == "ambiguous"  # its paraphrase is edit 1's prompt
    assert kind[1] in ("sibling", "ambiguous")
    assert kind[2:] == ["alone", "alone", "alone"]


def test_metrics_split_per_group_and_bad_records_name_the_line(tmp_path):
    import pytest

    from bench.siblings import split_metrics

    records = tmp_path / "r.jsonl"
    rows = [{"method": "meg", "id": f"s-{i}", "rel_ag": True, "gen_ag": i != 0} for i in range(5)]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = split_metrics(["ambiguous", "sibling", "alone", "alone", "alone"], EDITS, records)
    assert out["meg"]["ambiguous"] == {"n": 1, "rel_ag": 100.0, "gen_ag": 0.0}
    assert out["meg"]["alone"]["n"] == 3 and out["meg"]["all"]["gen_ag"] == 80.0
    # labelled files stand side by side: one method -> the label, several -> label/method
    other = tmp_path / "o.jsonl"
    other.write_text("".join(json.dumps({**r, "gen_ag": True}) + "\n" for r in rows)
                     + "".join(json.dumps({**r, "method": "ft", "rel_ag": False}) + "\n" for r in rows))
    both = split_metrics(["ambiguous", "sibling", "alone", "alone", "alone"], EDITS,
                         [("before", records), ("after", other)])
    assert set(both) == {"before", "after/meg", "after/ft"}
    assert both["before"] == out["meg"] and both["after/meg"]["all"]["gen_ag"] == 100.0
    assert both["after/ft"]["all"]["rel_ag"] == 0.0
    records.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"r.jsonl: record 2"):
        split_metrics(["alone"] * 5, EDITS, records)
