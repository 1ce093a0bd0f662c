"""Stage ``attach``: assemble the edit bundle from the stages' outputs (``meg.editor.EditedModel``).

The bundle is the directory ``EditedModel.save`` writes: encoder, router, the weight source's part
(``meg.sources``: the fitted weights; with ``generator.weights: generator`` the generator), w0 and a
manifest with the base model id and content hash, the layer, every setting and a sha256 of every
file; ``EditedModel.load`` refuses it against other base-model weights. The caller logs it as an
MLflow pyfunc model. Output: ``bundle/`` and ``report.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from meg import config
from meg.stages import fit as fit_stage
from meg.stages.common import StageResult, is_absent, load_base, read_edits, read_json, write_json, write_metrics


def run(view: dict, prepare_dir: Path, fit_dir: Path, encoder_dir: Path, router_dir: Path, generator_dir: Path,
        out_dir: Path) -> StageResult:
    from meg.editor import (BuildData, EditedModel, build_blocklist, build_exposure, bundle_lookup,
                            calibration_set, condition_encoder, generator_pairs, join_conditions, template_bank)
    from meg.evaluate import edited_locality
    from meg.encoder import QueryEncoder
    from meg.generator import WeightGenerator
    from meg.router import load_router
    from meg.sources import source_class

    t0 = time.time()
    cfg = config.meg_config(view)
    edits = read_edits(Path(prepare_dir) / "edits.jsonl")
    meta, tensors = fit_stage.weights_for(fit_dir, edits)
    loaded = load_base(view)
    encoder = QueryEncoder.load(Path(encoder_dir) / "encoder", device=cfg.device)
    saved = Path(router_dir) / "router"
    router = None if is_absent(saved) else load_router(saved, device=cfg.device)  # absent: an older "off" run
    trains = source_class(cfg).trains_generator  # the generator stage skipped training otherwise
    generator = WeightGenerator.load(Path(generator_dir) / "generator", device=cfg.device) if trains else None
    calibration = read_json(Path(router_dir) / "calibration.json")
    info = {
        "n_edits": len(edits),
        "fit": meta["report"],
        "calibration": calibration if calibration.get("threshold") is not None else None,
        "generator": read_json(Path(generator_dir) / "report.json"),
        "dataset": read_json(Path(prepare_dir) / "report.json")["dataset"],
        "edit_ids": [e.id for e in edits],
    }
    # what the build fitted, trained and calibrated on, against what the evaluate stage asks (meg.probes)
    pool = read_edits(Path(prepare_dir) / "pseudo.jsonl")
    data = BuildData(build_blocklist(edits), pool, fit_stage.read_rewordings(prepare_dir), None)
    contexts = dict(zip(meta["keys"], meta.get("contexts") or [[e.prompt] for e in edits]))
    generator_texts = []
    if generator is not None and cfg.generator_variants:
        data.bank = template_bank(cfg, pool, edits, data.blocklist, data.rewordings)
        _, rows, texts = generator_pairs(cfg, edits, encoder, data.bank, with_texts=True)
        generator_texts = [(t, edits[r].subject) for t, r in zip(texts[len(edits):], rows[len(edits):])]
    pseudo = calibration_set(cfg, pool) if cfg.router != "off" else None
    exposure = build_exposure(edits, cfg, data, contexts, pseudo, generator_texts)
    info["leaks"] = exposure.leaks(edits, [not x for x in edited_locality(edits, edits)])
    lookup, edit_prompts = bundle_lookup(cfg, tensors["weights"], edits)
    cond_encoder = condition_encoder(cfg) if generator is not None else None
    prompts = [e.prompt for e in edits]
    edit_cond = join_conditions(encoder.encode(prompts), cond_encoder, prompts) if cond_encoder else None
    model = EditedModel(loaded, meta["layer"], cfg.fit.act, encoder, router, generator, tensors["w0"], cfg,
                        lookup=lookup, info=info, cond_encoder=cond_encoder, edit_cond=edit_cond,
                        edit_prompts=edit_prompts, edit_targets=[e.target_new for e in edits])
    out = Path(out_dir)
    bundle = model.save(out / "bundle")
    size_mb = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2**20
    manifest = read_json(bundle / "manifest.json")
    report = {"base_model": manifest["base_model"], "base_model_hash": manifest["base_model_hash"],
              "layer": manifest["layer"], "n_edits": len(edits), "size_mb": size_mb}
    write_json(out / "report.json", report)
    metrics = {"n_edits": float(len(edits)), "size_mb": size_mb, "seconds": time.time() - t0,
               **{f"leaks_{k}": float(v) for k, v in info["leaks"].items() if k != "n_evaluated"}}
    write_metrics(out, metrics)
    return StageResult("attach", config.flat(view), metrics,
                       [out / "report.json", bundle / "manifest.json"], bundle=bundle,
                       tags={"meg.base_model": manifest["base_model"]},
                       summary=f"bundle of {len(edits)} edits on {manifest['base_model']} layer {manifest['layer']}: "
                               f"{size_mb:.1f} MB")
