"""`meg edit`, `meg ask`, `meg chat` end to end on a tiny random model saved as a local model directory."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from meg.cli import main
from tests.tiny_bundle import UNRELATED, tiny_config_dict, tiny_edits, tiny_model_dir


def write_facts(path: Path, edits) -> Path:
    with open(path, "w") as f:
        for e in edits:
            f.write(json.dumps({"id": e.id, "prompt": e.prompt, "target_new": e.target_new,
                                "rephrase_prompt": e.paraphrases[0]}) + "\n")
    return path


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """(bundle dir, work dir, stdout of `meg edit`) for the tiny edits, built once through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    facts = write_facts(root / "facts.jsonl", tiny_edits())
    config = root / "meg.json"
    config.write_text(json.dumps(tiny_config_dict()))
    out = root / "bundle"
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["edit", str(facts), "--model", str(tiny_model_dir()), "--out", str(out),
                     "--config", str(config), "--quiet"])
    assert code == 0
    return out, root / "bundle.work", buf.getvalue()


def test_edit_writes_a_bundle_and_says_where(edited):
    out, work, stdout = edited
    assert (out / "manifest.json").is_file()
    assert f"bundle written to {out}" in stdout and "edited 8 facts" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["info"]["n_edits"] == 8
    assert [e["id"] for e in manifest["info"]["edits"]] == [e.id for e in tiny_edits()]
    assert any((work / "fit").rglob("*.safetensors"))  # fitted weights kept for the next run


def test_edit_again_reuses_the_work_dir(edited, tmp_path):
    out, work, _ = edited
    facts = write_facts(tmp_path / "facts.jsonl", tiny_edits())
    config = tmp_path / "meg.json"
    config.write_text(json.dumps(tiny_config_dict()))
    stored = sorted(p.relative_to(work) for p in (work / "fit").rglob("*"))
    again = tmp_path / "again"
    assert main(["edit", str(facts), "--model", str(tiny_model_dir()), "--out", str(again), "--config",
                 str(config), "--work-dir", str(work), "--quiet"]) == 0
    assert sorted(p.relative_to(work) for p in (work / "fit").rglob("*")) == stored  # nothing refitted
    first = json.loads((out / "manifest.json").read_text())["info"]["fit"]
    second = json.loads((again / "manifest.json").read_text())["info"]["fit"]
    assert second["failed_ids"] == first["failed_ids"] and second["n_success"] == first["n_success"]


def test_ask_answers_and_explains(edited, capsys):
    out, _, _ = edited
    edit = tiny_edits()[2]
    assert main(["ask", str(out), edit.prompt, UNRELATED[0], "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert len(body["answers"]) == 2 and body["answers"][0].startswith(edit.target_new)
    assert main(["ask", str(out), edit.prompt, "--explain"]) == 0
    text = capsys.readouterr().out
    assert f"Q: {edit.prompt}" in text and "routed to edited knowledge: yes" in text
    assert f"nearest edit {edit.id}" in text and "base answer:" in text
    assert main(["ask", str(out), UNRELATED[0], "--explain"]) == 0
    text = capsys.readouterr().out
    assert "routed to edited knowledge: no" in text and "  why: " in text


def test_chat_reads_questions_until_quit(edited, monkeypatch, capsys):
    out, _, _ = edited
    edit = tiny_edits()[2]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{edit.prompt}\n\n:explain\n{UNRELATED[0]}\n:help\n:quit\nnever\n"))
    assert main(["chat", str(out)]) == 0
    lines = capsys.readouterr().out
    assert edit.target_new in lines and "explanations on" in lines
    assert "routed to edited knowledge: no" in lines and "never" not in lines.split(":quit")[0]


def test_bad_facts_exit_2_with_one_line_per_problem(tmp_path, capsys):
    facts = tmp_path / "bad.jsonl"
    facts.write_text('{"prompt": "A is", "target_new": "B"}\n{"prompt": "", "target_new": "C"}\n'
                     '{"prompt": "D is", "target_new": 5}\n')
    code = main(["edit", str(facts), "--model", str(tiny_model_dir()), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{facts}:record 2: field 'prompt'" in err and f"{facts}:record 3: field 'target_new'" in err
    assert not (tmp_path / "b").exists()


def test_bad_model_reference_and_config_exit_2(tmp_path, capsys):
    assert main(["ask", str(tmp_path / "missing"), "q"]) == 2
    assert "no such bundle directory" in capsys.readouterr().err
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"routr": "nearest"}))
    facts = write_facts(tmp_path / "f.jsonl", tiny_edits()[:1])
    assert main(["edit", str(facts), "--out", str(tmp_path / "b"), "--config", str(cfg)]) == 2
    assert "unknown setting 'routr'" in capsys.readouterr().err
    (tmp_path / "notabundle").mkdir()
    (tmp_path / "notabundle" / "keep.txt").write_text("precious")
    assert main(["edit", str(facts), "--out", str(tmp_path / "notabundle")]) == 2
    assert "not an edit bundle" in capsys.readouterr().err
    assert (tmp_path / "notabundle" / "keep.txt").read_text() == "precious"


def test_explanation_says_when_the_relation_check_sent_a_question_back():
    from meg.cli_model import format_explanation

    e = {"question": "The anthem of France is", "answer": "La Marseillaise", "base_answer": "La Marseillaise",
         "routed": False, "exact": False, "reason": "relation", "relation_cosine": 0.41, "relation_cut": 0.55,
         "confidence": 0.93, "nearest_edits": []}
    text = format_explanation(e)
    assert "routed to edited knowledge: no (confidence 0.930)" in text
    assert "asks another fact of it (relation check) (subject-masked cosine 0.410, cut 0.550)" in text
    assert "why:" not in format_explanation({**e, "routed": True, "exact": True, "reason": "exact"})
