"""Stage ``router``: fit the router on the edit prompts, threshold chosen on held-out pseudo-edits.

Chains ``meg.editor.calibration_set`` and ``meg.editor.fit_router``. The threshold is calibrated on
pseudo-edits of the same count as the edits (never on evaluation paraphrases or locality prompts),
so it is recalibrated whenever the edit set changes. Output: ``router/`` (with ``router.kind`` ``off``,
a router that sends every question to its nearest edit, uncalibrated) and ``calibration.json`` (the
chosen threshold, recall and rejection on the pseudo-edits, and the router's confusion there).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from meg import config
from meg.stages.common import StageResult, read_edits, write_json, write_metrics


def run(view: dict, prepare_dir: Path, encoder_dir: Path, out_dir: Path, progress: bool = True) -> StageResult:
    from meg.editor import calibration_set, fit_router
    from meg.encoder import QueryEncoder

    t0 = time.time()
    cfg = config.meg_config(view)
    edits = read_edits(Path(prepare_dir) / "edits.jsonl")
    pool = read_edits(Path(prepare_dir) / "pseudo.jsonl")
    encoder = QueryEncoder.load(Path(encoder_dir) / "encoder", device=cfg.device)
    router, calibration = fit_router(cfg, encoder, edits, calibration_set(cfg, pool))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    router.save(out / "router")  # with router.kind "off" too: it sends every question to its nearest edit
    calib = asdict(calibration) if calibration else {"router": cfg.router, "threshold": None}
    seconds = time.time() - t0
    write_json(out / "calibration.json", {"kind": cfg.router, "n_edits": len(edits), **calib, "seconds": seconds})
    metrics = {"seconds": seconds}
    if calibration:
        metrics.update(threshold=calibration.threshold, recall=calibration.recall, rejection=calibration.rejection,
                       edit_recall=calibration.edit_recall,
                       **({"relation_cut": calibration.relation_cut} if calibration.relation_cut is not None else {}),
                       **{f"pseudo_{k}": float(v) for k, v in calibration.confusion.items()})
    write_metrics(out, metrics)
    summary = (f"{cfg.router} router on {len(edits)} edits: threshold {calibration.threshold:.3f}, pseudo-edit "
               f"paraphrases routed {100 * calibration.recall:.1f}%, unrelated rejected {100 * calibration.rejection:.1f}%"
               if calibration else f"router {cfg.router}")
    return StageResult("router", config.flat(view), metrics, [out / "calibration.json"], summary=summary)
