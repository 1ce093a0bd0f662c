"""Stage ``encoder``: the query encoder, fine-tuned with InfoNCE on pseudo-edits (``meg.editor.encoder_for``).

It reads only the pseudo-edit pool, never the edits, so it reruns only when its settings or the pool
change. ``encoder_for`` keeps trained encoders under ``cache_dir/encoders`` by configuration and
training pairs: going back to earlier settings costs nothing. Output: ``encoder/`` (a saved
QueryEncoder) and ``report.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from meg import config
from meg.stages.common import StageResult, read_edits, write_json, write_metrics


def run(view: dict, prepare_dir: Path, out_dir: Path, cache_dir: Path | None = None,
        progress: bool = True) -> StageResult:
    from meg.editor import encoder_for

    t0 = time.time()
    cfg = config.meg_config(view)
    pool = read_edits(Path(prepare_dir) / "pseudo.jsonl")
    encoder = encoder_for(cfg, pool, progress=progress, cache_root=Path(cache_dir) / "encoders" if cache_dir else None)
    out = Path(out_dir)
    encoder.save(out / "encoder")
    n_pairs = min(cfg.n_pseudo_encoder, sum(1 for e in pool if e.paraphrases))
    seconds = time.time() - t0
    report = {"n_pairs": n_pairs, "trainable": encoder.config.trainable, "tuned_tensors": len(encoder.tuned),
              "dim": encoder.dim, "seconds": seconds}
    write_json(out / "report.json", report)
    metrics = {"n_pairs": float(n_pairs), "tuned_tensors": float(len(encoder.tuned)), "seconds": seconds}
    write_metrics(out, metrics)
    return StageResult("encoder", config.flat(view), metrics, [out / "report.json"],
                       summary=f"encoder ({encoder.config.trainable} layers tuned) on {n_pairs} pseudo-edit pairs, "
                               f"{seconds:.0f} s")
