"""Stage ``prepare``: the edit set, the pseudo-edits, and the base model's own locality answers.

Reads the raw facts under ``prepare.data_dir`` (tracked by data.dvc): a slice of a benchmark file
plus the fact store (``meg facts add``), resolved so that later facts override earlier ones on the
same prompt. Writes to ``out_dir``:

- ``edits.jsonl``   the edit set (validated, de-duplicated, stable ids);
- ``pseudo.jsonl``  the pseudo-edit pool: CounterFact *train* records disjoint from the edits and
                    from every probe (``meg.editor.pseudo_pool``), each paraphrase a rewording the
                    base model wrote (``meg.editor.with_rewordings``), for the encoder, the router
                    threshold and the template bank;
- ``rewordings.json`` per edit prompt, the rewordings its neuron may be fitted on (``meg.rewrite``;
                    none is a probe or has a probe paraphrase's template, ``meg.probes``);
- ``labels.json``   the pre-edit model's greedy answers to the locality prompts (the locality labels),
                    cached per prompt and base model under ``cache_dir`` so new facts cost only theirs;
- ``report.json``   counts, and every fact dropped and why.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from meg import config, facts
from meg.errors import FactProblem, FactsError
from meg.factstore import FactStore
from meg.stages.common import StageResult, load_base, read_json, write_json, write_jsonl, write_metrics


@contextmanager
def _captured_notes() -> Iterator[list[str]]:
    """Collect what meg.facts logs about dropped facts while reading (it logs, not returns, them)."""
    notes: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    logger = logging.getLogger(facts.__name__)
    handler, level = _Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield notes
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def edit_set(cfg: config.PrepareConfig, root: Path = Path(".")) -> tuple[list, dict]:
    """(edits, report): the benchmark slice followed by the fact store, resolved."""
    data = Path(root) / cfg.data_dir
    relpath, fmt = facts.BENCHMARKS[(cfg.dataset, cfg.split)]
    bench_path = data / relpath
    if cfg.n_edits and not bench_path.is_file():
        raise FactsError([FactProblem(str(bench_path), None, None,
                                      "missing; restore the raw facts with `meg data restore` or `dvc pull`")])
    with _captured_notes() as bench_notes:
        bench = facts.read_facts(bench_path, fmt) if cfg.n_edits else []
    sliced = bench[cfg.offset : cfg.offset + cfg.n_edits]
    store = FactStore(data / cfg.facts_dir)
    with _captured_notes() as store_notes:
        stored = store.load()
    edits, dropped = facts.resolve(sliced + stored)
    ids: dict[str, object] = {}
    problems = []
    for e in edits:
        other = ids.setdefault(e.id, e)
        if other is not e:
            problems.append(FactProblem(e.source or "fact store", None, "id",
                                        f"'{e.id}' is also the id of {other.source} (another prompt); give one of them a new id"))
    if problems:
        raise FactsError(problems)
    if not edits:
        raise FactsError([FactProblem(str(data), None, None, "the edit set is empty (prepare.n_edits is 0 and "
                                      "the fact store has no facts)")])
    report = {
        "dataset": f"{cfg.dataset}/{cfg.split}[{cfg.offset}:{cfg.offset + len(sliced)}]",
        "n_benchmark_records": len(bench),
        "n_slice": len(sliced),
        "store_files": [p.name for p in store.files()],
        "n_store_facts": len(stored),
        "n_edits": len(edits),
        "n_dropped": len(dropped),
        "dropped": dropped,
        "notes": store_notes,
        "n_benchmark_notes": len(bench_notes),
    }
    return edits, report


def _labels(view: dict, edits: list, cache_dir: Path | None, batch_size: int, progress: bool) -> dict:
    """The base model's own answers to each edit's locality prompt, cached per (model, prompt)."""
    from meg import evaluate

    loaded = load_base(view)
    cache_path = Path(cache_dir) / "labels" / f"{loaded.content_hash[:16]}.jsonl" if cache_dir else None
    known: dict[str, dict] = {}
    if cache_path and cache_path.is_file():
        for line in cache_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                known[row["prompt"]] = row
    prompts = [e.locality[0].prompt if e.locality else e.prompt for e in edits]
    todo = [e for e, p in zip(edits, prompts) if p not in known]
    if todo:
        if progress:
            print(f"prepare: base-model answers for {len(todo)} locality prompts "
                  f"({len(edits) - len(todo)} cached)", flush=True)
        fresh = evaluate.locality_labels(evaluate.EditedLM(loaded, batch_size=batch_size), todo)
        rows = [{"prompt": p, "text": t, "token_ids": ids}
                for p, t, ids in zip(fresh.prompts, fresh.texts, fresh.token_ids)]
        known.update({r["prompt"]: r for r in rows})
        if cache_path:
            write_jsonl(cache_path, list(known.values()))
    return {
        "model": loaded.model_id,
        "model_hash": loaded.content_hash,
        "prompts": prompts,
        "texts": [known[p]["text"] for p in prompts],
        "token_ids": [known[p]["token_ids"] for p in prompts],
    }


def read_labels(prepare_dir: Path, loaded=None):
    """The locality labels of a prepared edit set, checked against the loaded base model."""
    from meg.errors import BundleError
    from meg.evaluate import LocalityLabels

    d = read_json(Path(prepare_dir) / "labels.json")
    if loaded is not None and d["model_hash"] != loaded.content_hash:
        raise BundleError(f"{prepare_dir}/labels.json: answers of base model {d['model']} "
                          f"({d['model_hash'][:12]}), but the loaded model is {loaded.content_hash[:12]}; rerun prepare")
    return LocalityLabels(prompts=d["prompts"], texts=d["texts"], token_ids=d["token_ids"])


N_REWORDINGS = 8  # rewordings kept per edit prompt (fit.n_variants takes the first ones)


def run(view: dict, out_dir: Path, root: Path = Path("."), cache_dir: Path | None = None,
        progress: bool = True) -> StageResult:
    from meg.editor import build_blocklist, edit_rewordings, pseudo_pool, rewordings_for, with_rewordings

    cfg = config.section_config(view, "prepare")
    edits, report = edit_set(cfg, root)
    meg_cfg = config.meg_config(view)
    blocklist = build_blocklist(edits)
    rw = rewordings_for(load_base(view), meg_cfg, blocklist, progress,
                        Path(cache_dir) / "rewrites" if cache_dir else None)
    # every record: the file does not depend on n_pseudo
    pool = with_rewordings(pseudo_pool(edits, blocklist), rw, keep_context=meg_cfg.pseudo_context)
    rewordings = edit_rewordings(edits, rw, N_REWORDINGS)
    labels = _labels(view, edits, cache_dir, cfg.label_batch_size, progress)
    out = Path(out_dir)
    write_jsonl(out / "edits.jsonl", [e.to_dict() for e in edits])
    write_jsonl(out / "pseudo.jsonl", [e.to_dict() for e in pool])
    write_json(out / "rewordings.json", rewordings)
    write_json(out / "labels.json", labels)
    report["n_pseudo_pool"] = len(pool)
    report["n_rewordings"] = sum(len(v) for v in rewordings.values())
    write_json(out / "report.json", report)
    metrics = {k: float(report[k]) for k in ("n_edits", "n_slice", "n_store_facts", "n_dropped")}
    metrics["n_pseudo_pool"] = float(len(pool))
    write_metrics(out, metrics)
    return StageResult(
        "prepare", config.flat(view), metrics, [out / "report.json"],
        tags={"meg.dataset": report["dataset"]},
        summary=f"{len(edits)} edits ({report['n_slice']} benchmark + {report['n_store_facts']} stored, "
                f"{report['n_dropped']} dropped), {len(pool)} pseudo-edits",
    )
