"""Fact files: benchmarks, the user formats, every kind of bad input, de-duplication and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meg import facts
from meg.errors import FactsError
from meg.facts import EditRequest, Probe


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def jsonl(tmp_path: Path, *records: object, name: str = "facts.jsonl") -> Path:
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in records))


def problems(path: Path, fmt: str = "auto") -> list[str]:
    return [str(p) for p in facts.validate_file(path, fmt).problems]


def only_problem(path: Path, fmt: str = "auto") -> str:
    found = problems(path, fmt)
    assert len(found) == 1, found
    return found[0]


GOOD = {"prompt": "The capital of France is", "target_new": "Rome"}


# ---------------------------------------------------------------- benchmarks


def test_counterfact_benchmark_loads():
    edit, train = facts.load_benchmark("counterfact"), facts.load_benchmark("counterfact", "train")
    assert len(edit) == 10_000 and len(train) == 10_000
    first = edit[0]
    assert first.id == "cf-0"
    assert first.prompt == "The mother tongue of Danielle Darrieux is"
    assert first.target_new == "English" and first.target_old == "French"
    assert first.subject == "Danielle Darrieux"
    assert first.paraphrases == ("Where Danielle Darrieux is from, people speak the language of",)
    assert first.locality == (Probe("Michel Rocard is a native speaker of", "French"),)
    assert first.source == "easyedit_counterfact-edit.json:record 1"
    assert len({e.id for e in edit} | {e.id for e in train}) == 20_000
    texts = [t for e in train for t in e.paraphrases]
    assert not any(c in t for t in texts for c in "\t\n\r")


def test_zsre_benchmark_loads():
    edits = facts.load_benchmark("zsre")
    assert len(edits) == 1037
    first = edits[0]
    assert first.id == "zsre-0" and first.target_new == "2006" and first.target_old == "1998"
    assert first.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert first.locality[0].prompt.startswith("nq question:")
    assert first.portability[0].answer == "Athletics"
    assert edits[-1].id == "zsre-1036"


def test_unknown_benchmark_is_a_clear_error():
    with pytest.raises(Exception, match="zsre/edit"):
        facts.load_benchmark("zsre", "train")


def test_read_facts_detects_benchmark_formats():
    r = facts.validate_file(facts.DATASETS / "counterfact" / "easyedit_counterfact-edit.json")
    assert r.problems == [] and r.n_records == 10_000
    assert r.n_edits < 10_000 and any("the later one wins" in n for n in r.notes)
    assert facts.validate_file(facts.DATASETS / "zsre" / "zsre_mend_eval_portability_gpt4.json").n_edits == 1037


# ---------------------------------------------------------------- the request itself


def test_edit_request_strips_dicts_and_keys():
    e = EditRequest("a", "  The capital of France is ", " Rome ", paraphrases=[" France's capital: "],
                    locality=[{"prompt": "The capital of Spain is", "answer": "Madrid"}])
    assert (e.prompt, e.target_new, e.paraphrases) == ("The capital of France is", "Rome", ("France's capital:",))
    assert EditRequest.from_dict(json.loads(json.dumps(e.to_dict()))) == e
    assert len(e.content_key) == 16
    assert e.content_key == EditRequest("other", "The capital of France is", "Rome").content_key
    assert e.content_key != EditRequest("a", "The capital of France is", "Paris").content_key
    with pytest.raises(ValueError, match="target_new"):
        EditRequest("a", "p", "   ")
    with pytest.raises(ValueError, match="prompt"):
        EditRequest("a", "", "x")


# ---------------------------------------------------------------- user formats


def test_jsonl_round_trip(tmp_path):
    edits = [
        EditRequest("e1", "The capital of France is", "Rome", "Paris", "France", ("France's capital is",),
                    (Probe("The capital of Spain is", "Madrid"),), (Probe("Rome's country is", None),)),
        EditRequest("e2", "Toko Yasuda plays the", "piano"),
    ]
    path = jsonl(tmp_path, *(e.to_dict() for e in edits))
    back = facts.read_facts(path)
    assert [EditRequest.from_dict({**e.to_dict(), "source": ""}) for e in back] == edits
    assert back[1].source == f"{path}:record 2"


def test_csv_round_trip_and_paraphrase_columns(tmp_path):
    path = write(tmp_path, "facts.csv",
                 "id,prompt,target_new,target_old,subject,paraphrases,locality_prompt,locality_answer\r\n"
                 'c1,"The capital of France, famously, is",Rome,Paris,France,A|B||,The capital of Spain is,Madrid\r\n'
                 "\r\n"
                 "c2,Toko Yasuda plays the,piano,,,,,\r\n")
    first, second = facts.read_csv(path)
    assert first == EditRequest("c1", "The capital of France, famously, is", "Rome", "Paris", "France", ("A", "B"),
                                (Probe("The capital of Spain is", "Madrid"),), source=f"{path}:record 2")
    assert second.source.endswith(":record 4") and second.target_old is None and second.locality == ()
    one = write(tmp_path, "one.csv", "prompt,target_new,paraphrase\nThe sky is,green,The colour of the sky is\n")
    assert facts.read_facts(one)[0].paraphrases == ("The colour of the sky is",)


def test_aliases_and_json_list(tmp_path):
    record = {**GOOD, "ground_truth": "Paris", "rephrase_prompt": "France's capital is",
              "locality_prompt": "The capital of Spain is", "locality_ground_truth": "Madrid"}
    for path in (jsonl(tmp_path, record), write(tmp_path, "facts.json", json.dumps([record]))):
        (e,) = facts.read_facts(path)
        assert e.target_old == "Paris" and e.paraphrases == ("France's capital is",)
        assert e.locality == (Probe("The capital of Spain is", "Madrid"),)
    (e,) = facts.read_facts(jsonl(tmp_path, {**GOOD, "paraphrases": "one paraphrase", "id": 7}))
    assert e.paraphrases == ("one paraphrase",) and e.id == "7"


def test_automatic_ids_are_stable(tmp_path):
    a = facts.read_facts(jsonl(tmp_path, GOOD, name="a.jsonl"))[0]
    b = facts.read_facts(jsonl(tmp_path, {"prompt": " the  CAPITAL of France is", "target_new": "Berlin"},
                               {"prompt": "x", "target_new": "y"}, name="b.jsonl"))[0]
    assert a.id == b.id and a.id.startswith("u-") and len(a.id) == 14
    assert a.content_key != b.content_key


def test_whitespace_and_encodings_are_normalised(tmp_path):
    record = {"prompt": "Geography\r\n\n The capital\tof France is ", "target_new": " Rome"}
    (e,) = facts.read_facts(jsonl(tmp_path, record))
    assert (e.prompt, e.target_new) == ("Geography The capital of France is", "Rome")
    line = json.dumps(GOOD, ensure_ascii=False) + "\n"
    assert facts.read_facts(write(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + line.encode()))[0].target_new == "Rome"
    report = facts.validate_file(write(tmp_path, "utf16.jsonl", line.encode("utf-16")))
    assert report.problems == [] and report.n_edits == 1 and "UTF-16" in report.notes[0]


def test_unknown_fields_are_noted(tmp_path):
    report = facts.validate_file(jsonl(tmp_path, {**GOOD, "colour": "red"}))
    assert report.problems == [] and "'colour'" in report.notes[0]


# ---------------------------------------------------------------- bad input


def test_malformed_json_names_line_and_column(tmp_path):
    text = only_problem(write(tmp_path, "bad.json", '[\n  {"prompt": "a", "target_new": "b"},\n  {"prompt": }\n]'))
    assert text.startswith(f"{tmp_path / 'bad.json'}: invalid JSON at line 3, column 14: Expecting value")
    text = only_problem(write(tmp_path, "bad.jsonl", json.dumps(GOOD) + "\n" + '{"prompt": "x",\n'))
    assert text.startswith(f"{tmp_path / 'bad.jsonl'}:record 2: invalid JSON at column")


def test_not_utf8_names_byte_offset(tmp_path):
    first = json.dumps(GOOD).encode() + b'\n{"prompt": "caf'
    path = write(tmp_path, "latin1.jsonl", first + b'\xe9", "target_new": "x"}\n')
    text = only_problem(path)
    assert text.startswith(f"{path}: is not valid UTF-8: byte 0xE9 at byte offset {len(first)} (line 2)")


@pytest.mark.parametrize("content, expected", [
    ("", "file is empty"),
    ("  \n\n", "file is empty"),
    ("[]", "contains no records"),
    ('{"a": 1}', "the top level must be a JSON list of records, found an object"),
])
def test_empty_and_wrong_top_level(tmp_path, content, expected):
    assert only_problem(write(tmp_path, "f.json", content)) == f"{tmp_path / 'f.json'}: {expected}"


def test_missing_file_and_directory(tmp_path):
    report = facts.validate_file(tmp_path / "nope.jsonl")
    assert [str(p) for p in report.problems] == [f"{tmp_path / 'nope.jsonl'}: file not found"]
    assert report.problems[0].record is None
    assert "directory" in only_problem(tmp_path)
    with pytest.raises(FactsError, match="file not found"):
        facts.read_facts(tmp_path / "nope.jsonl")


def test_every_problem_in_a_file_is_reported(tmp_path):
    path = jsonl(
        tmp_path,
        GOOD,                                                   # line 1: good
        ["not", "an", "object"],                                # line 2
        {"target_new": "x"},                                    # line 3: no prompt
        {"prompt": "   ", "target_new": "x"},                   # line 4: empty prompt
        {"prompt": "p5", "target_new": 2006},                   # line 5: number
        {"prompt": "p6", "target_new": "x", "paraphrases": ["ok", 3]},
        {"prompt": "p7", "target_new": "x", "paraphrases": {"a": 1}},
        {"prompt": "p8\x00", "target_new": "x"},                # NUL
        {"prompt": "p9", "target_new": "x\x1b[31m"},            # escape
        {"prompt": "p10", "target_new": None},
        {"prompt": "p11", "target_new": "x", "locality": [{"answer": "y"}]},
        {"prompt": "p12", "target_new": "x", "target_old": "a", "ground_truth": "b"},
        {"prompt": "p13", "target_new": "x", "locality_answer": "y"},
    )
    f = str(path)
    assert problems(path) == [
        f"{f}:record 2: must be a JSON object, found a list",
        f"{f}:record 3: field 'prompt': is required but missing",
        f"{f}:record 4: field 'prompt': is empty",
        f"{f}:record 5: field 'target_new': must be a string, found the number 2006",
        f"{f}:record 6: field 'paraphrases[1]': must be a string, found the number 3",
        f"{f}:record 7: field 'paraphrases': must be a list of strings or a string, found an object",
        f"{f}:record 8: field 'prompt': contains control character U+0000 at position 2",
        f"{f}:record 9: field 'target_new': contains control character U+001B at position 1",
        f"{f}:record 10: field 'target_new': is required but null",
        f"{f}:record 11: field 'locality[0].prompt': is required but missing",
        f"{f}:record 12: field 'ground_truth': disagrees with 'target_old' (give only one of them)",
        f"{f}:record 13: field 'locality_answer': is given without 'locality_prompt'",
    ]
    with pytest.raises(FactsError) as info:
        facts.read_facts(path)
    assert len(info.value.problems) == 12
    report = facts.validate_file(path)
    assert report.n_records == 13 and report.n_edits == 1
    assert "record numbers are line numbers" in report.notes[0]


def test_benchmark_format_problems(tmp_path):
    cf = write(tmp_path, "cf.json", json.dumps([{"case_id": 1, "prompt": "p", "target_new": "t"},
                                                {"case_id": True, "prompt": "q", "target_new": ""}]))
    assert problems(cf) == [
        f"{cf}:record 2: field 'case_id': must be a string, found true/false",
        f"{cf}:record 2: field 'target_new': is empty",
    ]
    zsre = write(tmp_path, "z.json", json.dumps([{"src": "q?", "alt": "a", "answers": "old", "portability": [1]},
                                                 {"src": "r?", "alt": None}]))
    assert problems(zsre, "zsre") == [
        f"{zsre}:record 1: field 'portability': must be an object, found a list",
        f"{zsre}:record 2: field 'alt': is required but null",
    ]


def test_csv_problems(tmp_path):
    path = write(tmp_path, "facts.csv", "prompt,target\nThe sky is,green\n")
    report = facts.validate_file(path)
    assert [str(p) for p in report.problems] == [
        f"{path}: field 'target_new': required column is missing (the header has: prompt, target)"]
    assert report.problems[0].record is None
    path = write(tmp_path, "rows.csv", "prompt,target_new\nThe sky is,green\n , green\nA, B, C\nok,\n")
    assert problems(path) == [
        f"{path}:record 3: field 'prompt': is empty",
        f"{path}:record 4: has 3 cells but the header has 2 (quote cells with commas)",
        f"{path}:record 5: field 'target_new': is empty",
    ]


def test_duplicate_ids_with_different_content(tmp_path):
    path = jsonl(tmp_path, {**GOOD, "id": "x"}, {**GOOD, "id": "x"}, {"prompt": "q", "target_new": "t", "id": "x"})
    assert only_problem(path) == f"{path}:record 3: field 'id': 'x' is already used by record 1 for a different fact"


def test_unknown_extension_is_sniffed_or_rejected(tmp_path):
    assert facts.read_facts(write(tmp_path, "facts.txt", json.dumps([GOOD])))[0].target_new == "Rome"
    assert "cannot tell the format" in only_problem(write(tmp_path, "facts.txt", "prompt,target_new\n"))
    assert "not one JSON object per line" in only_problem(write(tmp_path, "list.jsonl", json.dumps([GOOD])))


# ---------------------------------------------------------------- duplicates and conflicts


def test_resolve_drops_duplicates_and_later_wins():
    a = EditRequest("1", "The capital of France is", "Rome", source="f:record 1")
    dup = EditRequest("2", "the capital of  France is", "Rome", source="f:record 2")
    other = EditRequest("3", "Toko Yasuda plays the", "piano", source="f:record 3")
    late = EditRequest("4", "The capital of France is", "Berlin", source="f:record 4")
    kept, notes = facts.resolve([a, dup, other, late])
    assert kept == [other, late]
    assert notes == [
        "f:record 2: duplicate of record 1 (same prompt and target); dropped",
        "f:record 4: conflicts with record 1 (prompt 'The capital of France is': 'Rome' vs 'Berlin');"
        " the later one wins",
    ]


def test_readers_resolve(tmp_path):
    path = jsonl(tmp_path, GOOD, GOOD, {**GOOD, "target_new": "Berlin"})
    assert [e.target_new for e in facts.read_facts(path)] == ["Berlin"]
    report = facts.validate_file(path)
    assert (report.n_records, report.n_edits, len(report.notes)) == (3, 1, 2)


# ---------------------------------------------------------------- the command


def validate_cli(path: Path) -> subprocess.CompletedProcess:
    """`meg facts validate` in its own process: its output alone, whatever else this process prints."""
    return subprocess.run([sys.executable, "-m", "meg.cli", "facts", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_cli_validate(tmp_path):
    good = jsonl(tmp_path, GOOD, name="good.jsonl")
    run = validate_cli(good)
    assert run.returncode == 0 and "1 records, 1 edits" in run.stdout
    bad = jsonl(tmp_path, {"prompt": "p"}, {"prompt": "", "target_new": "t"}, name="bad.jsonl")
    run = validate_cli(bad)
    assert run.returncode == 2
    assert run.stdout.splitlines() == [f"{bad}:record 1: field 'target_new': is required but missing",
                                       f"{bad}:record 2: field 'prompt': is empty"]


def test_cli_subprocess_exit_codes(tmp_path):
    bad = write(tmp_path, "bad.csv", "prompt\nx\n")
    run = subprocess.run([sys.executable, "-m", "meg.cli", "facts", "validate", str(bad), "--format", "csv"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stdout.splitlines() == [
        f"{bad}: field 'target_new': required column is missing (the header has: prompt)"]
    good = write(tmp_path, "good.csv", "prompt,target_new\nThe sky is,green\n")
    run = subprocess.run([sys.executable, "-m", "meg.cli", "facts", "validate", str(good)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().endswith(": OK")
