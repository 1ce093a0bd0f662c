"""bench.locality_split: locality prompts grouped by the edited subjects they name."""

import json

import pytest

from meg.facts import EditRequest, Probe


def _edit(i, prompt, subject, new, old, loc_prompt, loc_answer):
    return EditRequest(id=f"e-{i}", prompt=prompt, target_new=new, target_old=old, subject=subject,
                       locality=(Probe(loc_prompt, loc_answer),))


EDITS = [
    # its locality prompt asks Taipei's twin city, which edit 1 rewrites (old target Warsaw)
    _edit(0, "Oslo is a twin city of", "Oslo", "Lima", "Warsaw", "Taipei is a twin city of", "Warsaw"),
    _edit(1, "Taipei is a twin city of", "Taipei", "Moscow", "Warsaw", "Rome is a twin city of", "Paris"),
    # names Taipei too, but asks another fact of it
    _edit(2, "The mother tongue of Ann Lee is", "Ann Lee", "French", "English", "Taipei's official language is",
          "Chinese"),
    # names no edited subject ("Romeo" is not the edited "Rome"... nor is Rome edited)
    _edit(3, "Hank Aaron plays", "Hank Aaron", "chess", "baseball", "Romeo Zondervan plays", "soccer"),
]


def _rec(i, loc_ag, loc_out, routed, method="meg"):
    return {"method": method, "id": f"e-{i}", "loc_ag": loc_ag, "loc_tf": float(loc_ag), "loc_out": loc_out,
            "loc_routed": routed}


def test_groups_and_shares(tmp_path):
    from bench.locality_split import classify, main, split

    groups = classify(EDITS, [e.id for e in EDITS])
    assert groups["e-0"] == ("changed", ["Moscow"])
    assert groups["e-1"][0] == "clean"  # Rome is not an edited subject
    assert groups["e-2"] == ("same_subject", [])
    assert groups["e-3"][0] == "clean"  # whole words only: "Romeo" does not name anything
    rows = [_rec(0, False, " Moscow\n", True), _rec(1, True, " Paris", False),
            _rec(2, False, " French", True), _rec(3, True, " soccer", False)]
    out = split(groups, rows)["meg"]
    assert out["changed"] == {"n": 1, "loc_ag": 0.0, "loc_tf": 0.0, "routed": 100.0, "new_target": 100.0}
    assert out["clean"]["n"] == 2 and out["clean"]["loc_ag"] == 100.0 and out["clean"]["routed"] == 0.0
    assert out["same_subject"]["routed"] == 100.0 and out["all"]["loc_ag"] == 50.0

    # the command: a facts file, a records file, labelled; a bad record names the file and line
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": e.prompt, "target_new": e.target_new, "target_old": e.target_old,
                                  "subject": e.subject, "id": e.id,
                                  "locality": [{"prompt": e.locality[0].prompt, "answer": e.locality[0].answer}]}
                                 for e in EDITS]))
    records = tmp_path / "r.records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--facts", str(facts), "--records", f"run={records}", "--out", str(tmp_path / "o.json")]) == 0
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["groups"] == {"clean": 2, "same_subject": 1, "changed": 1}
    assert result["methods"]["run"]["changed"]["new_target"] == 100.0
    records.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"method": "meg", "id": "e-1"}) + "\n")
    with pytest.raises(SystemExit, match=r"r.records.jsonl: record 2.*loc_ag"):
        main(["--facts", str(facts), "--records", str(records), "--out", str(tmp_path / "o.json")])
