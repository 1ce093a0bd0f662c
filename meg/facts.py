"""Fact files: reading, checking and de-duplicating the facts to edit into a model.

Every fact becomes an :class:`EditRequest`: a prompt, the new target the model should give, and
optional extras used for evaluation (old target, subject, paraphrases, locality and portability
probes). ``read_facts(path)`` reads any accepted file; ``validate_file(path)`` (``meg facts validate``)
checks one and reports every problem at once, as ``FILE:record N: field 'X': reason``.

Formats
-------
The format comes from the file name; ``fmt`` ("counterfact", "zsre", "json", "jsonl", "csv")
overrides it.

* ``.jsonl`` / ``.ndjson``: one JSON object per line, with the canonical fields below. Blank lines
  are skipped.
* ``.csv``: a header row of canonical field names, then one fact per row. Rows shorter than the
  header are padded with empty cells; longer rows are a problem (quote cells that contain commas).
* ``.json``: a JSON list of objects. The first object decides how the list is read: with ``src``
  and ``alt`` it is ZsRE (MEND format), with ``case_id`` it is CounterFact (EasyEdit format),
  otherwise it is a list of canonical objects. An EasyEdit-style list without ``case_id`` is read
  as canonical objects, which accept the EasyEdit field names as aliases.
* Any other extension: a file starting with ``[`` is read as ``.json``, one starting with ``{``
  as ``.jsonl``.

Canonical fields (JSONL, CSV, JSON list)
  ``prompt`` (required), ``target_new`` (required), ``id``, ``target_old`` (alias ``ground_truth``),
  ``subject``, ``paraphrases`` (JSON: a list of strings or one string; CSV: entries separated by
  ``|``), ``paraphrase`` and ``rephrase_prompt`` (one paraphrase each; all paraphrase fields are
  combined), ``locality_prompt`` with ``locality_answer`` (alias ``locality_ground_truth``), and in
  JSON only ``locality`` and ``portability``: lists of ``{"prompt": ..., "answer": ...}``.
  ``source`` is ignored (``EditRequest.to_dict`` writes it, so its output reads back as JSONL).
  Other fields are ignored, with a note. A missing ``id`` becomes ``u-`` plus 12 hex digits of the
  SHA-256 of the normalised prompt (see below), so it stays the same across versions of the file
  and when only the target changes. Explicit ids may be strings or integers.

CounterFact (EasyEdit)
  ``case_id``, ``prompt``, ``target_new`` (required), ``subject``, ``ground_truth`` (old target),
  ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``. The id is ``cf-<case_id>``.

ZsRE (MEND)
  ``src`` (prompt) and ``alt`` (new target) are required; ``answers`` (the first is the old target),
  ``rephrase``, ``loc`` with ``loc_ans``, ``subject`` and ``portability`` (its ``New Question`` and
  ``New Answer``) are optional; ``pred`` and ``cond`` are ignored. The id is the record's ``id``,
  else ``zsre-<case_id>``, else ``zsre-<position>`` counting from 0.

Normalisation
-------------
* Encoding: UTF-8. A UTF-8 byte-order mark is dropped. A file starting with a UTF-16 or UTF-32
  byte-order mark (as some spreadsheet programs write) is decoded accordingly, with a note. A file
  whose first two bytes are one NUL and one other byte is UTF-16 or UTF-32 without a byte-order
  mark: a problem. Any other byte that is not UTF-8 is a problem naming its byte offset and line.
* Syntax: JSON objects naming one field twice, JSON nested too deeply for the parser, numbers it
  cannot hold, and CSV with a quote left open or text after a closing quote are problems (nothing is
  guessed).
* Text: surrounding whitespace is stripped. Tab, carriage return, newline, NEL (U+0085) and the
  Unicode line and paragraph separators (U+2028, U+2029) may appear inside a text; each run of
  whitespace containing one of them becomes a single space. Every other control character (U+0000
  to U+001F, U+007F to U+009F) is a problem, and so is an unpaired surrogate (a ``\ud800``-style
  JSON escape that encodes no character). A text longer than ``MAX_TEXT_CHARS`` (2,000) characters
  is a problem: facts are short prompts, and a runaway cell would be fitted as one.
* Empty optional fields count as absent; an empty or whitespace-only ``prompt`` or ``target_new``
  is a problem, as is a value of the wrong type (a number as ``target_new``, a paraphrase list
  holding a number, ...).

Record numbers
--------------
``record N`` is the 1-based position of the object in a JSON list, and the line number of the
object (JSONL) or of the row's first line (CSV, where the header is line 1). Problems about the
whole file (unreadable, bad JSON, a missing CSV column) carry no record number.

Duplicates and conflicts
------------------------
Two facts with the same normalised prompt (case-folded, whitespace collapsed) and the same target
are duplicates: the first is kept. With different targets they conflict: the later one wins. Both
give a note naming the records. Two records with the same explicit id but different content are a
problem. The shipped benchmarks (``load_benchmark``) keep every record: they skip this step, though
their text is normalised like any other (ROME's paraphrase prefixes lose their newlines).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from meg.errors import ConfigError, FactProblem, FactsError

log = logging.getLogger(__name__)

FORMATS = ("auto", "counterfact", "zsre", "json", "jsonl", "csv")
DATASETS = Path(__file__).parent / "datasets"
BENCHMARKS: dict[tuple[str, str], tuple[str, str]] = {
    ("counterfact", "edit"): ("counterfact/easyedit_counterfact-edit.json", "counterfact"),
    ("counterfact", "train"): ("counterfact/easyedit_counterfact-train.json", "counterfact"),
    ("zsre", "edit"): ("zsre/zsre_mend_eval_portability_gpt4.json", "zsre"),
}

_BAD_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff]")
_LAYOUT = re.compile(r" *[\t\r\n\x85\u2028\u2029][\t\r\n\x85\u2028\u2029 ]*")
MAX_TEXT_CHARS = 2000
_OTHER_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_CSV_FIELDS = frozenset(
    "id prompt target_new target_old ground_truth subject paraphrases paraphrase rephrase_prompt "
    "locality_prompt locality_answer locality_ground_truth source".split()
)
_JSON_FIELDS = _CSV_FIELDS | {"locality", "portability"}
_REQUIRED_COLUMNS = ("prompt", "target_new")


def normalise_prompt(text: str) -> str:
    """The form under which two prompts count as the same fact: case-folded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


def _auto_id(prompt: str) -> str:
    return "u-" + hashlib.sha256(normalise_prompt(prompt).encode("utf-8")).hexdigest()[:12]


def _opt_text(value: Any) -> str | None:
    return (str(value).strip() or None) if value is not None else None


@dataclass(frozen=True)
class Probe:
    """A prompt asked to check an edit, with the answer expected (None when unknown)."""

    prompt: str
    answer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"Probe: 'prompt' must be a non-empty string, got {self.prompt!r}")
        object.__setattr__(self, "prompt", self.prompt.strip())
        object.__setattr__(self, "answer", _opt_text(self.answer))


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit into a model: ``prompt`` should be completed by ``target_new``."""

    id: str
    prompt: str
    target_new: str
    target_old: str | None = None
    subject: str | None = None
    paraphrases: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    source: str = ""  # where the fact came from, e.g. "facts.jsonl:record 12"

    def __post_init__(self) -> None:
        for name in ("id", "prompt", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"EditRequest: '{name}' must be a non-empty string, got {value!r}")
            object.__setattr__(self, name, value.strip())
        object.__setattr__(self, "target_old", _opt_text(self.target_old))
        object.__setattr__(self, "subject", _opt_text(self.subject))
        object.__setattr__(self, "paraphrases", tuple(p.strip() for p in self.paraphrases if p.strip()))
        for name in ("locality", "portability"):
            probes = getattr(self, name)
            object.__setattr__(self, name, tuple(p if isinstance(p, Probe) else _probe(p) for p in probes))

    @property
    def content_key(self) -> str:
        """16 hex digits identifying (prompt, target_new); the key for cached fitted weights."""
        return hashlib.sha256(f"{self.prompt}\x00{self.target_new}".encode("utf-8")).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict; ``from_dict`` reads it back, and so does the JSONL reader."""
        return {
            "id": self.id, "prompt": self.prompt, "target_new": self.target_new,
            "target_old": self.target_old, "subject": self.subject, "paraphrases": list(self.paraphrases),
            "locality": _probe_dicts(self.locality), "portability": _probe_dicts(self.portability),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EditRequest:
        """The inverse of ``to_dict``; optional keys may be missing."""
        return cls(
            id=str(d["id"]), prompt=d["prompt"], target_new=d["target_new"],
            target_old=d.get("target_old"), subject=d.get("subject"),
            paraphrases=tuple(d.get("paraphrases") or ()), locality=tuple(d.get("locality") or ()),
            portability=tuple(d.get("portability") or ()), source=d.get("source") or "",
        )


def _probe(d: Mapping[str, Any]) -> Probe:
    return Probe(d["prompt"], d.get("answer"))


def _probe_dicts(probes: tuple[Probe, ...]) -> list[dict[str, str | None]]:
    return [{"prompt": p.prompt, "answer": p.answer} for p in probes]


@dataclass
class ValidationReport:
    """What ``validate_file`` found. ``n_edits`` counts the good facts left after de-duplication."""

    path: str
    n_records: int
    n_edits: int
    problems: list[FactProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------- one record


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    for kind, name in ((dict, "an object"), (list, "a list"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


class _Object(dict):
    """A JSON object as parsed, remembering the field names it gave more than once."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        names = [k for k, _ in pairs]
        self.repeated = sorted({k for k in names if names.count(k) > 1}) if len(names) > len(self) else []


def _loads(text: str) -> Any:
    return json.loads(text, strict=False, object_pairs_hook=_Object)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class _Record:
    """One raw record being read. Its methods collect problems instead of raising."""

    def __init__(self, obj: dict, file: str, n: int, problems: list[FactProblem], prefix: str = ""):
        self.obj, self.file, self.n, self.problems, self.prefix = obj, file, n, problems, prefix
        self.start = len(problems)
        for name in getattr(obj, "repeated", ()):  # escaped when unprintable: the message must print
            self.problem(name if name.isprintable() else repr(name)[1:-1],
                         "appears more than once in the object (which one is meant?)")

    def problem(self, name: str | None, reason: str) -> None:
        self.problems.append(FactProblem(self.file, self.n, None if name is None else self.prefix + name, reason))

    def child(self, label: str, value: Any) -> _Record | None:
        """A nested object (e.g. one locality probe), reporting its fields as ``label.field``."""
        if not isinstance(value, dict):
            self.problem(label, f"must be an object, found {_type_name(value)}")
            return None
        return _Record(value, self.file, self.n, self.problems, f"{self.prefix}{label}.")

    def _clean(self, name: str, value: Any, required: bool) -> str | None:
        if value is None:
            if required:
                self.problem(name, "is required but null")
            return None
        if not isinstance(value, str):
            self.problem(name, f"must be a string, found {_type_name(value)}")
            return None
        bad = _BAD_CONTROL.search(value)
        if bad:
            what = "an unpaired surrogate" if "\ud800" <= bad.group() <= "\udfff" else "control character"
            self.problem(name, f"contains {what} U+{ord(bad.group()):04X} at position {bad.start()}")
            return None
        text = _LAYOUT.sub(" ", value).strip()
        if not text and required:
            self.problem(name, "is empty")
        if len(text) > MAX_TEXT_CHARS:
            self.problem(name, f"is {len(text)} characters long; the limit is {MAX_TEXT_CHARS}")
            return None
        return text or None

    def text(self, *names: str, required: bool = False) -> str | None:
        """The first of ``names`` (a field and its aliases) that holds a value."""
        given = [(n, self.obj[n]) for n in names if n in self.obj]
        filled = [(n, v) for n, v in given if not _blank(v)]
        if len({repr(v) for _, v in filled}) > 1:
            self.problem(filled[1][0], f"disagrees with '{self.prefix}{filled[0][0]}' (give only one of them)")
        if not given:
            if required:
                self.problem(names[0], "is required but missing")
            return None
        return self._clean(*(filled or given)[0], required)

    def texts(self, name: str, sep: str | None = None) -> tuple[str, ...]:
        """A list of strings, or one string (split on ``sep`` when given, empty parts dropped)."""
        value = self.obj.get(name)
        if value is None:
            return ()
        if isinstance(value, str):
            items = [(name, part) for part in (value.split(sep) if sep else [value]) if part.strip()]
        elif isinstance(value, list):
            items = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        else:
            self.problem(name, f"must be a list of strings or a string, found {_type_name(value)}")
            return ()
        cleaned = [self._clean(label, v, required=True) for label, v in items]
        return tuple(t for t in cleaned if t)

    def ident(self, name: str, required: bool = False) -> str | None:
        value = self.obj.get(name)
        if _blank(value):
            if required:
                self.problem(name, "is required but missing" if value is None else "is empty")
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return self._clean(name, value, required=True)

    def probes(self, name: str) -> tuple[Probe, ...]:
        """A JSON list of {"prompt", "answer"} objects."""
        value = self.obj.get(name)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.problem(name, f"must be a list of {{'prompt', 'answer'}} objects, found {_type_name(value)}")
            return ()
        subs = [self.child(f"{name}[{i}]", item) for i, item in enumerate(value)]
        return tuple(p for s in subs if s for p in _pair(s, "prompt", ("answer",), required=True))

    def build(self, ident: str | None, prompt: str | None, target: str | None, **extra: Any) -> EditRequest | None:
        if len(self.problems) > self.start or not (ident and prompt and target):
            return None
        extra["paraphrases"] = tuple(dict.fromkeys(extra.get("paraphrases", ())))
        return EditRequest(ident, prompt, target, source=f"{self.file}:record {self.n}", **extra)


def _pair(rec: _Record, question: str, answers: tuple[str, ...], required: bool = False) -> tuple[Probe, ...]:
    """One probe from a prompt field and an answer field (with its aliases)."""
    prompt, answer = rec.text(question, required=required), rec.text(*answers)
    if answer is not None and prompt is None and _blank(rec.obj.get(question)) and not required:
        rec.problem(answers[0], f"is given without '{rec.prefix}{question}'")
    return (Probe(prompt, answer),) if prompt else ()


def _canonical(rec: _Record, index: int, csv_cells: bool = False, ident: str | None = None) -> EditRequest | None:
    prompt, target = rec.text("prompt", required=True), rec.text("target_new", required=True)
    ident = ident or rec.ident("id") or (prompt and _auto_id(prompt))
    paraphrases = rec.texts("paraphrases", "|" if csv_cells else None) + rec.texts("paraphrase")
    locality = _pair(rec, "locality_prompt", ("locality_answer", "locality_ground_truth"))
    portability: tuple[Probe, ...] = ()
    if not csv_cells:
        locality += rec.probes("locality")
        portability = rec.probes("portability")
    return rec.build(
        ident, prompt, target, target_old=rec.text("target_old", "ground_truth"), subject=rec.text("subject"),
        paraphrases=paraphrases + rec.texts("rephrase_prompt"), locality=locality, portability=portability,
    )


def _counterfact(rec: _Record, index: int) -> EditRequest | None:
    case = rec.ident("case_id", required=True)
    return _canonical(rec, index, ident=f"cf-{case}" if case else None)


def _zsre(rec: _Record, index: int) -> EditRequest | None:
    given, case = rec.ident("id"), rec.ident("case_id")
    ident = given or (f"zsre-{case}" if case else f"zsre-{index}")
    prompt, target = rec.text("src", required=True), rec.text("alt", required=True)
    answers = rec.texts("answers")
    port = rec.child("portability", rec.obj["portability"]) if rec.obj.get("portability") is not None else None
    return rec.build(
        ident, prompt, target, target_old=answers[0] if answers else None, subject=rec.text("subject"),
        paraphrases=rec.texts("rephrase"), locality=_pair(rec, "loc", ("loc_ans",)),
        portability=_pair(port, "New Question", ("New Answer",)) if port else (),
    )


_BUILDERS: dict[str, Callable[[_Record, int], EditRequest | None]] = {
    "counterfact": _counterfact,
    "zsre": _zsre,
    "json": _canonical,
    "jsonl": _canonical,
    "csv": lambda rec, index: _canonical(rec, index, csv_cells=True),
}


# ---------------------------------------------------------------- one file


@dataclass
class _Parsed:
    file: str
    container: str = ""
    n_records: int = 0
    edits: list[EditRequest] = field(default_factory=list)
    problems: list[FactProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, record: int | None, name: str | None, reason: str) -> None:
        self.problems.append(FactProblem(self.file, record, name, reason))


NEWLINE = b"\n"


def _decode(data: bytes, out: _Parsed) -> str | None:
    skip, codec = (3, "utf-8") if data.startswith(codecs.BOM_UTF8) else (0, "utf-8")
    for bom, name in _OTHER_BOMS if not skip else ():
        if data.startswith(bom):
            skip, codec = len(bom), name
            out.notes.append(f"{out.file}: decoded as {name.upper()} (byte-order mark found); UTF-8 is preferred")
            break
    if codec == "utf-8" and len(data) >= skip + 2 and (data[skip] == 0) != (data[skip + 1] == 0):
        out.problem(None, None, "looks like UTF-16 or UTF-32 without a byte-order mark (NUL bytes between the "
                    "characters); save the file as UTF-8")
        return None
    try:
        return data[skip:].decode(codec)
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = f" (line {data.count(NEWLINE, 0, offset) + 1})" if codec == "utf-8" else ""
        out.problem(None, None, f"is not valid {codec.upper()}: byte 0x{data[offset]:02X} at byte offset {offset}{line}"
                    " cannot be decoded; save the file as UTF-8")
        return None


def _read_text(path: Path, out: _Parsed) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        out.problem(None, None, "file not found")
        return None
    except IsADirectoryError:
        out.problem(None, None, "is a directory, not a fact file")
        return None
    except OSError as e:
        out.problem(None, None, f"cannot be read: {e.strerror or e}")
        return None
    text = _decode(data, out)
    if text is not None and not text.strip():
        out.problem(None, None, "file is empty")
        return None
    return text


def _container(path: Path, fmt: str, text: str, out: _Parsed) -> str | None:
    if fmt in ("jsonl", "csv"):
        return fmt
    if fmt != "auto":
        return "json"
    ext = path.suffix.lower()
    kinds = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "json"}
    kind = kinds.get(ext) or {"[": "json", "{": "jsonl"}.get(text.lstrip()[:1])
    if kind is None:
        out.problem(None, None, f"cannot tell the format of a '{ext or 'no extension'}' file; "
                    "name it .json, .jsonl or .csv, or give the format")
    return kind


def _json_error(e: Exception) -> str:
    """What json.loads refused, beyond syntax: too deep a nesting, a number too long to convert."""
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"invalid JSON: {e}"


def _json_records(text: str, out: _Parsed) -> list[tuple[int, Any]] | None:
    try:
        value = _loads(text)
    except json.JSONDecodeError as e:
        out.problem(None, None, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
        return None
    except (ValueError, RecursionError) as e:
        out.problem(None, None, _json_error(e))
        return None
    if not isinstance(value, list):
        out.problem(None, None, f"the top level must be a JSON list of records, found {_type_name(value)}")
        return None
    out.n_records = len(value)
    return [(i + 1, v) for i, v in enumerate(value)]


def _jsonl_records(text: str, out: _Parsed) -> list[tuple[int, Any]] | None:
    if text.lstrip().startswith("["):
        out.problem(None, None, "holds a JSON list, not one JSON object per line; name it .json")
        return None
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        out.n_records += 1
        try:
            records.append((n, _loads(line)))
        except json.JSONDecodeError as e:
            out.problem(n, None, f"invalid JSON at column {e.colno}: {e.msg}")
        except (ValueError, RecursionError) as e:
            out.problem(n, None, _json_error(e))
    return records


def _csv_header(header: list[str], out: _Parsed) -> bool:
    for name in _REQUIRED_COLUMNS:
        if name not in header:
            out.problem(None, name, f"required column is missing (the header has: {', '.join(header) or 'nothing'})")
    for name in sorted({h for h in header if h and header.count(h) > 1}):
        out.problem(None, name, "column appears more than once in the header")
    return len(out.problems) == 0


def _csv_records(text: str, out: _Parsed) -> list[tuple[int, Any]] | None:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as e:  # an unclosed quote in the header runs to the end of the file
        out.problem(1, None, f"bad CSV header: {e}")
        return None
    if not _csv_header(header, out):
        return None
    records = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader, None)
        except csv.Error as e:
            out.problem(start, None, f"bad CSV: {e}")
            break
        if row is None:
            return records
        if not any(cell.strip() for cell in row):
            continue
        out.n_records += 1
        if len(row) > len(header):
            out.problem(start, None, f"has {len(row)} cells but the header has {len(header)} (quote cells with commas)")
            continue
        records.append((start, dict(zip(header, row + [""] * (len(header) - len(row))))))
    return records


def _detect(records: list[tuple[int, Any]]) -> str:
    first = records[0][1] if records else None
    if isinstance(first, dict) and "src" in first and "alt" in first:
        return "zsre"
    if isinstance(first, dict) and "case_id" in first:
        return "counterfact"
    return "json"


def _note_unknown(records: list[tuple[int, Any]], kind: str, out: _Parsed) -> None:
    known = {"json": _JSON_FIELDS, "jsonl": _JSON_FIELDS, "csv": _CSV_FIELDS}.get(kind)
    if known is None:
        return
    unknown = sorted({k for _, obj in records if isinstance(obj, dict) for k in obj if k and k not in known})
    if unknown:
        out.notes.append(f"{out.file}: ignored unknown field(s): {', '.join(map(repr, unknown))}")


def _check_ids(numbered: list[tuple[int, EditRequest]], out: _Parsed) -> None:
    """Explicit ids must be unique unless the records are identical (automatic ids may repeat)."""
    seen: dict[str, tuple[int, EditRequest]] = {}
    for n, e in numbered:
        if e.id == _auto_id(e.prompt):
            continue
        first = seen.setdefault(e.id, (n, e))
        if first[1] is not e and replace(first[1], source="") != replace(e, source=""):
            out.problem(n, "id", f"'{e.id}' is already used by record {first[0]} for a different fact")


def _parse(path: Path, fmt: str, label: str) -> _Parsed:
    if fmt not in FORMATS:
        raise ValueError(f"unknown fact format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = _Parsed(file=label)
    text = _read_text(path, out)
    container = _container(path, fmt, text, out) if text is not None else None
    if container is None:
        return out
    out.container = container
    read = {"json": _json_records, "jsonl": _jsonl_records, "csv": _csv_records}[container]
    records = read(text, out)
    if records is None:
        return out
    kind = container if fmt == "auto" else fmt
    if fmt == "auto" and container == "json":
        kind = _detect(records)
    if not records and not out.problems:
        out.problem(None, None, "contains no records")
    numbered = []
    for index, (n, obj) in enumerate(records):
        if not isinstance(obj, dict):
            out.problem(n, None, f"must be a JSON object, found {_type_name(obj)}")
            continue
        edit = _BUILDERS[kind](_Record(obj, out.file, n, out.problems), index)
        if edit is not None:
            numbered.append((n, edit))
    _note_unknown(records, kind, out)
    _check_ids(numbered, out)
    out.problems.sort(key=lambda p: p.record or 0)
    out.edits = [e for _, e in numbered]
    return out


# ---------------------------------------------------------------- public API


def _where(e: EditRequest, relative_to: EditRequest | None = None) -> str:
    """The fact's source ("record N" alone when in the same file as ``relative_to``), else its id."""
    if not e.source:
        return f"id {e.id!r}"
    file, sep, n = e.source.rpartition(":record ")
    if sep and relative_to is not None and relative_to.source.startswith(file + sep):
        return f"record {n}"
    return e.source


def resolve(edits: list[EditRequest]) -> tuple[list[EditRequest], list[str]]:
    """Drop duplicate facts (the first is kept) and settle conflicts (the later one wins).

    Facts match on the normalised prompt. Returns the kept facts, in order, and one note per fact
    dropped. A fact that wins a conflict takes the later position.
    """
    kept: dict[str, EditRequest] = {}
    notes: list[str] = []
    for e in edits:
        key = normalise_prompt(e.prompt)
        prev = kept.get(key)
        if prev is not None and prev.target_new == e.target_new:
            notes.append(f"{_where(e)}: duplicate of {_where(prev, e)} (same prompt and target); dropped")
            continue
        if prev is not None:
            notes.append(f"{_where(e)}: conflicts with {_where(prev, e)} (prompt {e.prompt!r}: "
                         f"{prev.target_new!r} vs {e.target_new!r}); the later one wins")
            del kept[key]
        kept[key] = e
    return list(kept.values()), notes


def read_facts(path: str | Path, fmt: str = "auto") -> list[EditRequest]:
    """Read a fact file in any accepted format, de-duplicated; FactsError lists every problem."""
    out = _parse(Path(path), fmt, str(path))
    if out.problems:
        raise FactsError(out.problems)
    kept, notes = resolve(out.edits)
    for note in out.notes + notes:
        log.info(note)
    return kept


def read_counterfact(path: str | Path) -> list[EditRequest]:
    """A CounterFact file in EasyEdit's format (a JSON list)."""
    return read_facts(path, "counterfact")


def read_zsre(path: str | Path) -> list[EditRequest]:
    """A ZsRE file in MEND's format (a JSON list)."""
    return read_facts(path, "zsre")


def read_jsonl(path: str | Path) -> list[EditRequest]:
    """One canonical JSON object per line."""
    return read_facts(path, "jsonl")


def read_csv(path: str | Path) -> list[EditRequest]:
    """A CSV file with a header row of canonical field names."""
    return read_facts(path, "csv")


def validate_file(path: str | Path, fmt: str = "auto") -> ValidationReport:
    """Check a fact file. Bad content never raises: every problem found is in the report."""
    out = _parse(Path(path), fmt, str(path))
    kept, notes = resolve(out.edits)
    if out.container in ("jsonl", "csv") and any(p.record is not None for p in out.problems):
        notes.insert(0, f"{path}: record numbers are line numbers in the file")
    return ValidationReport(str(path), out.n_records, len(kept), out.problems, out.notes + notes)


@lru_cache(maxsize=None)
def _benchmark(relpath: str, fmt: str) -> tuple[EditRequest, ...]:
    path = DATASETS / relpath
    out = _parse(path, fmt, path.name)
    if out.problems:
        raise FactsError(out.problems)
    return tuple(out.edits)


def load_benchmark(name: str, split: str = "edit") -> list[EditRequest]:
    """A benchmark shipped with the package, with every record (no de-duplication).

    ``counterfact`` has splits ``edit`` and ``train`` (10,000 records each); ``zsre`` has ``edit``
    (1,037 records). Use ``resolve`` to drop duplicates and conflicting facts.
    """
    entry = BENCHMARKS.get((name, split))
    if entry is None:
        known = ", ".join(f"{n}/{s}" for n, s in BENCHMARKS)
        raise ConfigError(f"unknown benchmark {name!r} split {split!r}; available: {known}")
    return list(_benchmark(*entry))
