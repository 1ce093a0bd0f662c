"""Bad fact files: every one is refused with FILE:record N: field 'X': reason, or read under a
documented normalisation (meg.facts module docstring); a refused file leaves the fact store as it was."""

from __future__ import annotations

import codecs
import json
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meg import facts
from meg.errors import FactsError
from meg.facts import EditRequest
from meg.factstore import FactStore
from tests.pipeline.conftest import subprocess_env
from tests.reliability.plugin import count

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD = {"prompt": "The capital of France is", "target_new": "Rome"}
LINE = json.dumps(GOOD) + "\n"
CURRENT = [EditRequest("e-1", "The mother tongue of Danielle Darrieux is", "English", source="edits.jsonl:record 1"),
           EditRequest("e-2", "Toko Yasuda plays the", "piano", source="edits.jsonl:record 2")]


def fault(what: str, expect: str, category: str = "bad fact file"):
    return pytest.mark.fault(category, what, expect)


def write(tmp: Path, name: str, data: bytes | str) -> Path:
    path = Path(tmp) / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def problems(path: Path) -> list[str]:
    """The problems validate_file reports; read_facts must raise FactsError with the same ones."""
    found = [str(p) for p in facts.validate_file(path).problems]
    if found:
        with pytest.raises(FactsError) as info:
            facts.read_facts(path)
        assert [str(p) for p in info.value.problems] == found
    return found


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden and temporary ones too), byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}


# ---------------------------------------------------------------- refused, with file, record and field

REFUSED = [
    pytest.param("cut.json", ("[" + LINE + "," + LINE)[:-9], None, None, "invalid JSON at line 2, column",
                 marks=fault("JSON list truncated inside a string", "refused: invalid JSON at line and column")),
    pytest.param("cut.jsonl", LINE + LINE[:30], 2, None, "invalid JSON at column",
                 marks=fault("JSONL truncated inside the last record", "refused: record, invalid JSON at column")),
    pytest.param("cut.csv", 'prompt,target_new\nA is,B\nC is,"D and', 3, None, "bad CSV: unexpected end of data",
                 marks=fault("CSV truncated inside a quoted cell", "refused: record, bad CSV")),
    pytest.param("header-quote.csv", 'prompt,"target_new\nA is,B\n', 1, None, "bad CSV header: unexpected end of data",
                 marks=fault("CSV header with an unclosed quote", "refused: record 1, bad CSV header")),
    pytest.param("quote.csv", 'prompt,target_new\n"A" is,B\n', 2, None, "bad CSV: ',' expected after '\"'",
                 marks=fault("CSV text after a closing quote", "refused: record, bad CSV")),
    pytest.param("latin1.csv", "prompt,target_new\nThe café is,open\n".encode("latin-1"), None, None,
                 "is not valid UTF-8: byte 0xE9 at byte offset 25 (line 2)",
                 marks=fault("latin-1 CSV", "refused: byte offset and line of the first bad byte")),
    pytest.param("latin1.json", json.dumps([{**GOOD, "subject": "Zoë"}], ensure_ascii=False).encode("latin-1"),
                 None, None, "is not valid UTF-8: byte 0xEB",
                 marks=fault("latin-1 JSON", "refused: byte offset and line of the first bad byte")),
    pytest.param("u16.jsonl", LINE.encode("utf-16-le"), None, None, "looks like UTF-16 or UTF-32 without a byte-order",
                 marks=fault("UTF-16-LE JSONL without byte-order mark", "refused: names the likely encoding")),
    pytest.param("u16be.csv", "prompt,target_new\nA is,B\n".encode("utf-16-be"), None, None,
                 "looks like UTF-16 or UTF-32 without a byte-order",
                 marks=fault("UTF-16-BE CSV without byte-order mark", "refused: names the likely encoding")),
    pytest.param("u32.json", json.dumps([GOOD]).encode("utf-32-le"), None, None,
                 "looks like UTF-16 or UTF-32 without a byte-order",
                 marks=fault("UTF-32 JSON without byte-order mark", "refused: names the likely encoding")),
    pytest.param("empty.jsonl", "", None, None, "file is empty",
                 marks=fault("empty JSONL file", "refused: file is empty")),
    pytest.param("blank.jsonl", "\n \n\t\n", None, None, "file is empty",
                 marks=fault("JSONL of blank lines", "refused: file is empty")),
    pytest.param("empty.csv", "", None, None, "file is empty", marks=fault("empty CSV file", "refused: file is empty")),
    pytest.param("header.csv", "prompt,target_new\n", None, None, "contains no records",
                 marks=fault("CSV with a header only", "refused: contains no records")),
    pytest.param("bom-only.jsonl", codecs.BOM_UTF8, None, None, "file is empty",
                 marks=fault("a byte-order mark and nothing else", "refused: file is empty")),
    pytest.param("nothing.jsonl", "{}\n", 1, "prompt", "is required but missing",
                 marks=fault("record without any field", "refused: record, field 'prompt' missing")),
    pytest.param("short.csv", "prompt,target_new,subject\nA is\n", 2, "target_new", "is empty",
                 marks=fault("CSV row missing cells", "refused: record, field 'target_new' empty")),
    pytest.param("list.jsonl", json.dumps({**GOOD, "prompt": ["a", "b"]}), 1, "prompt",
                 "must be a string, found a list",
                 marks=fault("prompt is a list", "refused: record, field, type found")),
    pytest.param("obj.jsonl", json.dumps({**GOOD, "target_new": {"x": 1}}), 1, "target_new",
                 "must be a string, found an object",
                 marks=fault("target is an object", "refused: record, field, type found")),
    pytest.param("float.jsonl", json.dumps({**GOOD, "id": 1.5}), 1, "id", "must be a string, found the number 1.5",
                 marks=fault("id is a float", "refused: record, field, type found")),
    pytest.param("bool.jsonl", json.dumps({**GOOD, "id": False}), 1, "id", "must be a string, found true/false",
                 marks=fault("id is a boolean", "refused: record, field, type found")),
    pytest.param("nan.jsonl", '{"prompt": NaN, "target_new": "b"}', 1, "prompt",
                 "must be a string, found the number nan",
                 marks=fault("NaN as prompt", "refused: record, field, type found")),
    pytest.param("subj.jsonl", json.dumps({**GOOD, "subject": 7}), 1, "subject", "must be a string, found the number 7",
                 marks=fault("optional field of the wrong type", "refused: record, field, type found")),
    pytest.param("loc.jsonl", json.dumps({**GOOD, "locality": "Paris"}), 1, "locality",
                 "must be a list of {'prompt', 'answer'} objects, found a string",
                 marks=fault("probe list given as a string", "refused: record, field, type found")),
    pytest.param("long.jsonl", json.dumps({**GOOD, "prompt": "x" * (facts.MAX_TEXT_CHARS + 1)}), 1, "prompt",
                 f"is {facts.MAX_TEXT_CHARS + 1} characters long; the limit is {facts.MAX_TEXT_CHARS}",
                 marks=fault("very long prompt (2,001 characters)", "refused: record, field, length and limit")),
    pytest.param("huge.csv", "prompt,target_new\nA is," + "y" * 100_000 + "\n", 2, "target_new",
                 "is 100000 characters long",
                 marks=fault("100,000-character CSV cell", "refused: record, field, length")),
    pytest.param("del.jsonl", json.dumps({**GOOD, "prompt": "The capital\x7f of"}), 1, "prompt",
                 "contains control character U+007F at position 11",
                 marks=fault("DEL control character", "refused: record, field, code point and position")),
    pytest.param("c1.jsonl", json.dumps({**GOOD, "target_new": "Rome\x9b31m"}), 1, "target_new",
                 "contains control character U+009B at position 4",
                 marks=fault("C1 control character (CSI)", "refused: record, field, code point and position")),
    pytest.param("vt.csv", "prompt,target_new\nA\x0bis,B\n", 2, "prompt", "contains control character U+000B",
                 marks=fault("vertical tab in a CSV cell", "refused: record, field, code point and position")),
    pytest.param("surrogate.jsonl", '{"prompt": "caf\\ud800", "target_new": "b"}', 1, "prompt",
                 "contains an unpaired surrogate U+D800 at position 3",
                 marks=fault("unpaired surrogate escape", "refused: record, field, code point (no crash)")),
    pytest.param("twice.jsonl", '{"prompt": "a is", "target_new": "b", "prompt": "c is"}', 1, "prompt",
                 "appears more than once in the object",
                 marks=fault("one field given twice in a JSON object", "refused: record, field (no silent last-wins)")),
    pytest.param("twice-odd.jsonl", '{"\\ud800": 1, "\\ud800": 2, "prompt": "a is", "target_new": "b"}', 1, "\\ud800",
                 "appears more than once in the object",
                 marks=fault("an unprintable field name given twice", "refused: record, field escaped (printable)")),
    pytest.param("deep.json", "[" * 50_000, None, None, "invalid JSON: nested too deeply",
                 marks=fault("JSON nested 50,000 deep", "refused: invalid JSON (no RecursionError)")),
    pytest.param("bigint.jsonl", '{"prompt": "a", "target_new": "b", "id": ' + "9" * 5000 + "}", 1, None,
                 "invalid JSON: Exceeds the limit",
                 marks=fault("5,000-digit number", "refused: record (no ValueError)")),
    pytest.param("ids.csv", "id,prompt,target_new\n7,A is,B\n7,C is,D\n", 3, "id", "'7' is already used by record 2",
                 marks=fault("duplicate id in a CSV file", "refused: record, field 'id', the first record")),
]
REFUSED = [pytest.param(*p.values, marks=p.marks, id=p.values[0]) for p in REFUSED]


@pytest.mark.parametrize("name, content, record, field, reason", REFUSED)
def test_refused_with_file_record_and_field(tmp_path, name, content, record, field, reason):
    path = write(tmp_path, name, content)
    found = problems(path)
    where = str(path) + (f":record {record}" if record is not None else "") + (f": field '{field}'" if field else "")
    assert found and found[0].startswith(f"{where}: {reason}"), found


# ---------------------------------------------------------------- read under a documented normalisation

def _one(path: Path) -> EditRequest:
    report = facts.validate_file(path)
    assert report.problems == [], report.problems
    (edit,) = facts.read_facts(path)
    return edit


@pytest.mark.fault("bad fact file", "UTF-8 byte-order mark (CSV, JSON, JSONL)", "accepted: the mark is dropped")
@pytest.mark.parametrize("name, text", [("bom.csv", "prompt,target_new\nThe capital of France is,Rome\n"),
                                        ("bom.json", json.dumps([GOOD])), ("bom.jsonl", LINE)])
def test_utf8_bom_is_dropped(tmp_path, name, text):
    with_bom = _one(write(tmp_path, name, codecs.BOM_UTF8 + text.encode()))
    plain = _one(write(tmp_path, "plain-" + name, text))
    assert (with_bom.prompt, with_bom.target_new, with_bom.id) == (plain.prompt, plain.target_new, plain.id)


@pytest.mark.fault("bad fact file", "UTF-16 CSV with byte-order mark (spreadsheet export)",
                   "accepted: decoded as UTF-16, with a note")
def test_utf16_csv_with_bom_is_decoded(tmp_path):
    path = write(tmp_path, "sheet.csv", "prompt,target_new\r\nThe café is,open\r\n".encode("utf-16"))
    assert _one(path).prompt == "The café is"
    assert "UTF-16" in facts.validate_file(path).notes[0]


@pytest.mark.fault("bad fact file", "CRLF line ends, NEL and U+2028 inside texts",
                   "accepted: each whitespace run with a line break becomes one space")
def test_line_breaks_become_spaces(tmp_path):
    assert _one(write(tmp_path, "crlf.csv", "prompt,target_new\r\n\"A\r\nis\",B\r\n")).prompt == "A is"
    edit = _one(write(tmp_path, "sep.jsonl", json.dumps({"prompt": "A\u2028 is\x85there", "target_new": "B\u2029"})))
    assert (edit.prompt, edit.target_new) == ("A is there", "B")


@pytest.mark.fault("bad fact file", "prompt of exactly the length limit", "accepted")
def test_text_at_the_limit_is_accepted(tmp_path):
    edit = _one(write(tmp_path, "limit.jsonl", json.dumps({**GOOD, "prompt": " " + "x" * facts.MAX_TEXT_CHARS + " "})))
    assert len(edit.prompt) == facts.MAX_TEXT_CHARS


@pytest.mark.fault("contradictory facts", "same prompt, two targets, in one file (also differing in case and spacing)",
                   "accepted: the later record wins, a note names both records")
def test_contradiction_within_one_file(tmp_path):
    path = write(tmp_path, "f.jsonl", LINE + json.dumps({"prompt": "the  CAPITAL of France is", "target_new": "Paris"}))
    (edit,) = facts.read_facts(path)
    assert edit.target_new == "Paris" and edit.source.endswith(":record 2")
    note = facts.validate_file(path).notes[-1]
    assert note.startswith(f"{path}:record 2: conflicts with record 1") and "the later one wins" in note


@pytest.mark.fault("contradictory facts", "same prompt, two targets, across two files added to the store",
                   "accepted: counted as an override; the later file wins when the store is read")
def test_contradiction_across_files(tmp_path):
    store = FactStore(tmp_path / "facts")
    first = store.add(write(tmp_path, "a.jsonl", LINE), CURRENT)
    current = CURRENT + store.load()
    second = store.add(write(tmp_path, "b.jsonl", json.dumps({**GOOD, "target_new": "Paris"})), current)
    assert (first.n_new, second.n_override) == (1, 1)
    kept, notes = facts.resolve(CURRENT + store.load())
    assert [e.target_new for e in kept if e.prompt == GOOD["prompt"]] == ["Paris"]
    assert "0002-b.jsonl:record 1: conflicts with" in notes[0] and "0001-a.jsonl:record 1" in notes[0]


@pytest.mark.fault("contradictory facts", "the same id for two prompts across files",
                   "refused: record, field 'id', the fact using it; store unchanged")
def test_duplicate_id_across_files_is_refused(tmp_path):
    store = FactStore(tmp_path / "facts")
    store.add(write(tmp_path, "a.jsonl", json.dumps({**GOOD, "id": "k1"})), CURRENT)
    before = snapshot(store.root)
    clash = write(tmp_path, "b.jsonl", LINE + json.dumps({"id": "k1", "prompt": "Mars has moons called",
                                                          "target_new": "Phobos"}))
    with pytest.raises(FactsError) as info:
        store.add(clash, CURRENT + store.load())
    assert str(info.value).startswith(f"{clash}:record 2: field 'id': 'k1' is already used by ")
    assert snapshot(store.root) == before


# ---------------------------------------------------------------- properties

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", " ", "\t", "The capital of France is", "Rome", "x\x00y", "a\x1bb", "\u2028", "é", "a\r\nb"])
VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                     max_leaves=6)
FIELDS = ["id", "prompt", "target_new", "target_old", "subject", "paraphrases", "paraphrase", "locality",
          "portability", "locality_prompt", "locality_answer", "ground_truth", "source", "other"]
RECORD = st.dictionaries(st.sampled_from(FIELDS), VALUE | TEXT, max_size=6) | VALUE


def _check_report(path: Path) -> facts.ValidationReport:
    """Whatever the content: no exception but FactsError, every problem names the file, accepted texts are clean."""
    report = facts.validate_file(path)
    for line in report.notes + [str(p) for p in report.problems]:
        line.encode("utf-8")  # printable as it is (no unpaired surrogate from the file)
    for p in report.problems:
        assert str(p).startswith(f"{path}:") and p.reason
        assert p.record is None or p.record >= 1
    if report.problems:
        with pytest.raises(FactsError):
            facts.read_facts(path)
        return report
    for e in facts.read_facts(path):
        for text in (e.id, e.prompt, e.target_new, e.target_old or "x", e.subject or "x", *e.paraphrases):
            assert text == text.strip() and text and len(text) <= facts.MAX_TEXT_CHARS
            assert not facts._BAD_CONTROL.search(text) and "\n" not in text and "\r" not in text
    return report


@pytest.mark.fault("bad fact file", "random bytes as .json, .jsonl, .csv, .txt (property)",
                   "no crash: refused naming the file, or read into clean texts")
@PROPERTY
@given(data=st.binary(max_size=300), ext=st.sampled_from([".json", ".jsonl", ".csv", ".txt"]))
def test_property_arbitrary_bytes_never_crash(data, ext):
    count()
    with tempfile.TemporaryDirectory() as tmp:
        _check_report(write(Path(tmp), "f" + ext, data))


@pytest.mark.fault("bad fact file", "random JSON records: any fields, types, control characters, nesting (property)",
                   "each problem names file, record and a known field; accepted texts are clean")
@PROPERTY
@given(records=st.lists(RECORD, min_size=1, max_size=5), ext=st.sampled_from([".json", ".jsonl"]))
def test_property_random_records_are_refused_by_name_or_clean(records, ext):
    count()
    text = json.dumps(records) if ext == ".json" else "".join(json.dumps(r) + "\n" for r in records)
    with tempfile.TemporaryDirectory() as tmp:
        report = _check_report(write(Path(tmp), "f" + ext, text))
    for p in report.problems:
        if p.record is not None and ext == ".jsonl":
            assert p.record <= len(records)
        if p.field is not None and p.record is not None:
            assert p.field.split("[")[0].split(".")[0] in FIELDS + ["case_id", "src", "alt"]


CSV_CELL = st.text(alphabet=string.printable + "é\u2028\x85\x7f\x00", max_size=12)


@pytest.mark.fault("bad fact file", "random CSV rows: short, long, quotes, controls, NUL, DEL, U+2028 (property)",
                   "refused naming file and record, or read into clean texts")
@PROPERTY
@given(rows=st.lists(st.lists(CSV_CELL, min_size=0, max_size=4), min_size=1, max_size=5))
def test_property_random_csv_rows(rows):
    count()
    text = "prompt,target_new,subject\n" + "\n".join(",".join(r) for r in rows) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        _check_report(write(Path(tmp), "f.csv", text))


def _good_file(records: list[dict], ext: str) -> str:
    return json.dumps(records) if ext == ".json" else "".join(json.dumps(r) + "\n" for r in records)


GOOD_RECORDS = st.lists(st.builds(lambda i, t: {"id": f"k{i}", "prompt": f"Fact number {i} is", "target_new": t},
                                  st.integers(0, 99), st.sampled_from(["Rome", "Paris", "a heron"])),
                        min_size=1, max_size=4, unique_by=lambda r: r["id"])


@pytest.mark.fault("bad fact file", "valid JSON / JSONL files cut at a random byte (property)",
                   "refused, or (JSONL cut at a line end) a subset of the facts: never an altered fact")
@PROPERTY
@given(records=GOOD_RECORDS, ext=st.sampled_from([".json", ".jsonl"]), cut=st.floats(0, 1, exclude_max=True))
def test_property_truncated_json_never_invents_facts(records, ext, cut):
    """A JSON or JSONL file cut anywhere is refused, or (cut at a line end) reads as a subset of its facts."""
    count()
    data = _good_file(records, ext).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), "f" + ext, data[: int(len(data) * cut)])
        report = _check_report(path)
        if not report.problems:
            assert ext == ".jsonl"
            full = {(r["id"], r["prompt"], r["target_new"]) for r in records}
            assert {(e.id, e.prompt, e.target_new) for e in facts.read_facts(path)} <= full


@pytest.mark.fault("bad fact file", "`facts add` of good facts mixed with random records (property)",
                   "refused: the store byte for byte unchanged; accepted: only a new file added")
@PROPERTY
@given(records=st.lists(RECORD, min_size=1, max_size=4), good=GOOD_RECORDS)
def test_property_store_is_unchanged_after_a_refused_file(records, good):
    count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = FactStore(tmp / "facts")
        store.add(write(tmp, "first.jsonl", _good_file(good, ".jsonl")), CURRENT)
        before = snapshot(store.root)
        src = write(tmp, "new.jsonl", _good_file(good + records, ".jsonl"))
        if facts.validate_file(src).problems:
            with pytest.raises(FactsError):
                store.add(src, CURRENT + store.load())
            assert snapshot(store.root) == before
        else:
            report = store.add(src, CURRENT + store.load())
            after = snapshot(store.root)
            assert {k: v for k, v in after.items() if k in before} == before
            assert len(after) == len(before) + (report.written is not None)


# ---------------------------------------------------------------- the command

@pytest.mark.fault("bad fact file", "`meg facts add` of a latin-1 file, a store already holding facts",
                   "exit 2, one line naming file and byte; data/facts byte-for-byte unchanged")
def test_cli_facts_add_refuses_and_leaves_the_store(workspace):
    store = workspace / "data" / "facts"
    good = write(workspace, "good.jsonl",
                 json.dumps({"prompt": "The mascot of the Zorbl team is", "target_new": "a heron"}))
    FactStore(store).add(good, CURRENT)
    before = snapshot(store)
    bad = write(workspace, "bad.csv", "prompt,target_new\nThe café is,open\n".encode("latin-1"))
    done = subprocess.run([sys.executable, "-m", "meg.cli", "facts", "add", str(bad), "--no-dvc"], cwd=workspace,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout.splitlines() == [f"{bad}: is not valid UTF-8: byte 0xE9 at byte offset 25 (line 2) cannot be "
                                        "decoded; save the file as UTF-8"]
    assert "the fact store is unchanged" in done.stderr
    assert snapshot(store) == before and len(before) == 1


# ---------------------------------------------------------------- a failing store

@pytest.mark.fault("failing store", "the disk fills up (or an interrupt arrives) while the fact store writes a file",
                   "the error is raised; the store byte for byte unchanged, no temporary file left; a retry adds it")
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_fact_store_write_failing_half_way_leaves_the_store(tmp_path, monkeypatch, error):
    import os

    store = FactStore(tmp_path / "facts")
    store.add(write(tmp_path, "a.jsonl", LINE), CURRENT)
    before = snapshot(store.root)
    src = write(tmp_path, "b.jsonl", json.dumps({"prompt": "Mars has moons called", "target_new": "Phobos"}))

    def fail(fd):
        raise error

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fail)
        with pytest.raises(type(error)):
            store.add(src, CURRENT + store.load())
    assert snapshot(store.root) == before
    assert store.add(src, CURRENT + store.load()).written.name == "0002-b.jsonl"


@pytest.mark.fault("failing store", "a stored fact file changed by hand into bad JSON",
                   "reading the store fails naming the file, record and problem (never skipped silently)")
def test_damaged_store_file_is_reported(tmp_path):
    store = FactStore(tmp_path / "facts")
    written = store.add(write(tmp_path, "a.jsonl", LINE + json.dumps({"prompt": "Mars has", "target_new": "moons"})),
                        CURRENT).written
    written.write_bytes(written.read_bytes()[:-20])
    with pytest.raises(FactsError, match=f"{written}:record 2: invalid JSON"):
        store.load()
