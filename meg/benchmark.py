"""Run editors side by side on the same model, edits and metrics (used by bench.quality and demo)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from meg import evaluate, lm
from meg.editors import make_editor

COLUMNS = ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf", "score", "es", "ps", "ns", "cf_score",
           "edit_seconds", "eval_seconds", "peak_rss_mb")


class PeakRSS:
    """Peak resident memory of this process over a block, sampled in a background thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)


@dataclass
class BenchResult:
    model: str
    model_hash: str
    dataset: str
    n_edits: int
    n_evaluated: int | None = None  # edits whose questions were asked (the first ones), None = all
    protocol: str = "ag"  # "ag" (completion, meg.evaluate.evaluate) or "chat" (meg.evaluate.evaluate_chat)
    methods: dict[str, dict] = field(default_factory=dict)
    records: dict[str, list[dict]] = field(default_factory=dict)
    extras: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"protocol": self.protocol, "model": self.model, "model_hash": self.model_hash, "dataset": self.dataset,
                "n_edits": self.n_edits, "n_evaluated": self.n_evaluated or self.n_edits, "methods": self.methods, "details": self.extras}

    def write(self, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.summary(), indent=2))
        records = out.with_suffix(".records.jsonl.gz")  # compressed: about a tenth of the text
        with gzip.open(records, "wt", encoding="utf-8") as f:
            for name, rows in self.records.items():
                for r in rows:
                    f.write(json.dumps({"method": name, **r}) + "\n")
        return records

    def table(self) -> str:
        heads = ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf", "score", "es", "ps", "ns", "cf",
                 "edit_s", "eval_s", "rss_mb")
        labels = {name: f"{name} ({self.extras.get(name, {}).get('label') or name})" for name in self.methods}
        width = max([len("method"), *map(len, labels.values())]) + 2
        lines = [f"{'method':<{width}}" + "".join(f"{h:>8}" for h in heads)]
        for name, m in self.methods.items():
            cells = [m.get(c) for c in COLUMNS]
            lines.append(f"{labels[name]:<{width}}" + "".join(f"{'-':>8}" if v is None else f"{v:>8.1f}" for v in cells))
        return "\n".join(lines)


def locality_labels(loaded: lm.LoadedModel, edits: list, batch_size: int = 32,
                    cache_dir: Path | None = None, protocol: str = "ag") -> evaluate.LocalityLabels:
    """The pre-edit model's answers to the edits' locality prompts (``protocol`` "chat": as chat answers); with
    ``cache_dir``, kept there under a key of the model's content hash, the prompts, the batch size and the
    protocol, so that runs on the same edits (a scale series asks the same first edits at every size) compute
    them once."""
    base = evaluate.EditedLM(loaded, batch_size=batch_size)
    base.progress = True
    prompts = [e.locality[0].prompt if e.locality else e.prompt for e in edits]
    path = None
    if cache_dir is not None:
        blob = json.dumps([loaded.content_hash, batch_size, evaluate.MAX_NEW_TOKENS, prompts]
                          + ([protocol] if protocol != "ag" else []))
        path = Path(cache_dir) / f"locality-labels-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            try:
                labels = evaluate.LocalityLabels(**json.loads(path.read_text()))
                if labels.prompts == prompts:
                    print(f"locality labels of the pre-edit model: {path}", flush=True)
                    return labels
            except (ValueError, TypeError) as e:
                print(f"locality labels: {path} is damaged, computed again: {e}", flush=True)
    t0 = time.time()
    labels = evaluate.locality_labels(base, edits, protocol)
    print(f"locality labels from the pre-edit model: {time.time() - t0:.1f} s", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # runs that share a work dir may write it at once
        tmp.write_text(json.dumps({"prompts": labels.prompts, "texts": labels.texts, "token_ids": labels.token_ids}))
        os.replace(tmp, path)
    return labels


def exposure_of(editor, edited, edits: list):
    """What an edit fitted, trained or calibrated on (``meg.probes.Exposure``): the editor's account, or for an
    editor that gives none, each edit's prompt."""
    if hasattr(editor, "exposure"):
        return editor.exposure(edited, edits)
    from meg.probes import prompt_only_exposure

    return prompt_only_exposure(edits)


def run_methods(
    loaded: lm.LoadedModel,
    edits: list,
    dataset: str,
    methods: list[str],
    batch_size: int = 32,
    on_result: Callable[[str, dict], None] | None = None,
    editor_factory: Callable[[str], evaluate.Editor] = make_editor,
    labels: evaluate.LocalityLabels | None = None,
    n_evaluated: int | None = None,
    protocol: str = "ag",
) -> BenchResult:
    """Apply each editor to the same edits (one batch) and evaluate it; the base model is restored after each.

    ``labels`` are the pre-edit model's locality answers when already known (the pipeline's prepare
    stage computes them once); otherwise they are computed here. ``protocol`` "chat" asks every probe as a
    user turn of the chat template (meg.evaluate.evaluate_chat); the labels must then be chat labels. ``n_evaluated`` asks the questions of
    the first that many edits only (all edits are applied): at 10,000 edits the questions of 1,000 cost a
    tenth, and because the edit sets of a scale series are prefixes of one another, every size is then
    measured on the same questions.
    """
    if n_evaluated is not None and not 1 <= n_evaluated <= len(edits):
        raise ValueError(f"n_evaluated must be in 1..{len(edits)}, got {n_evaluated}")
    asked = edits[:n_evaluated] if n_evaluated else edits
    if labels is None:
        labels = locality_labels(loaded, asked, batch_size, protocol=protocol)
    elif len(labels.prompts) != len(asked):
        raise ValueError(f"{len(labels.prompts)} locality labels for {len(asked)} evaluated edits")
    result = BenchResult(loaded.model_id, loaded.content_hash, dataset, len(edits),
                         n_evaluated if n_evaluated and n_evaluated < len(edits) else None, protocol=protocol)
    from meg.probes import Blocklist

    probes = Blocklist.of_probes(asked)  # what the evaluation asks; every editor keeps it out of what it learns
    skip = evaluate.edited_locality(asked, edits)
    for name in methods:
        editor = editor_factory(name)
        editor.probes = probes
        with PeakRSS() as peak:
            t0 = time.time()
            edited = editor.apply(loaded, edits)
            edited.batch_size = batch_size
            edited.progress = True
            edit_seconds = time.time() - t0
            try:
                res = evaluate.evaluate(edited, asked, labels, skip, protocol)
                details = getattr(edited, "routing_records", None)  # MeG: how each query was routed (reports)
                if details is not None:
                    res.records = [r | d for r, d in zip(res.records, details(asked))]
                leaks = exposure_of(editor, edited, edits).leaks(asked, [not x for x in skip])
            finally:
                edited.close()
        metrics = dict(res.metrics)
        metrics.update(edit_seconds=edit_seconds, eval_seconds=res.seconds, peak_rss_mb=peak.peak_mb)
        result.methods[name] = metrics
        result.records[name] = res.records
        result.extras[name] = dict(getattr(edited, "extra_metrics", {}) or {})
        result.extras[name]["leaks"] = {**leaks, "locality_probes_edited": sum(skip)}
        result.extras[name]["label"] = getattr(editor, "label", "") or name
        print(f"{name}: score {metrics['score']:.1f} (edit {edit_seconds:.1f} s, eval {res.seconds:.1f} s)", flush=True)
        if on_result:
            on_result(name, metrics)
    return result
