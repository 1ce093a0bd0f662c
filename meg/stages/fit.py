"""Stage ``fit``: one neuron per edit (``meg.fit.fit_edits``), sharded, cached per edit.

``run`` fits the edits of one shard: shard ``i`` of ``n`` holds the edits whose content key, read as
a number, is ``i`` modulo ``n``, so an edit stays in its shard when others are added. The per-edit
cache of ``fit_edits`` (keyed by the edit's content, the base model's hash, the layer and the fit
settings) lives under ``cache_dir``, outside the stage's outputs: rerunning after new facts arrive
fits only the new or changed edits, and an interrupted run resumes. ``merge`` puts shards back in
the order of the edit set.

Output (a directory): ``weights.safetensors`` with ``weights`` (N, 2D+1), ``w0`` (2D+1,), ``success``,
``steps`` and ``loss`` (N,) in edit order, and ``fit.json`` with the ids, content keys, layer and the
fit report (success rate, steps, failed ids).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from meg import config
from meg.errors import BundleError, ConfigError
from meg.hashing import file_sha256
from meg.stages.common import StageResult, load_base, read_edits, read_json, write_json, write_metrics

TENSORS = ("weights", "w0", "success", "steps", "loss")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"fit: bad shard {text!r} (expected i/n, e.g. 0/4)") from None
    if not 0 <= i < n:
        raise ConfigError(f"fit: bad shard {text!r} (need 0 <= i < n)")
    return i, n


def shard_of(content_key: str, n: int) -> int:
    return int(content_key, 16) % n


def _write(out: Path, ids, keys, layer, tensors: dict, report: dict, extra: dict) -> None:
    """weights.safetensors, then fit.json naming its sha256 (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".weights.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(out / "weights.safetensors")
    write_json(out / "fit.json", {"ids": ids, "keys": keys, "layer": layer, "report": report,
                                  "weights_sha256": file_sha256(out / "weights.safetensors"), **extra})


def read(fit_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(fit.json, tensors) of a fit output directory."""
    fit_dir = Path(fit_dir)
    meta = read_json(fit_dir / "fit.json")
    weights = fit_dir / "weights.safetensors"
    if "weights_sha256" in meta and weights.is_file() and file_sha256(weights) != meta["weights_sha256"]:
        raise BundleError(f"{weights}: does not match the sha256 in fit.json (changed, or a write was "
                          "interrupted); rerun the fit stage")
    try:
        tensors = load_file(str(weights))
    except (OSError, ValueError) as e:
        raise BundleError(f"{fit_dir}/weights.safetensors: unreadable ({e}); rerun the fit stage") from e
    return meta, tensors


def read_rewordings(prepare_dir: Path) -> dict[str, list[str]]:
    """The edits' rewordings the prepare stage chose (``rewordings.json``; none in an older output)."""
    path = Path(prepare_dir) / "rewordings.json"
    return read_json(path) if path.is_file() else {}


def weights_for(fit_dir: Path, edits: list) -> tuple[dict, dict[str, torch.Tensor]]:
    """The fit output, checked to hold exactly the given edits in their order."""
    meta, tensors = read(fit_dir)
    if meta["keys"] != [e.content_key for e in edits]:
        raise BundleError(f"{fit_dir}: fitted for another edit set than the prepared one; rerun the fit stage")
    return meta, tensors


def run(view: dict, prepare_dir: Path, out_dir: Path, cache_dir: Path | None = None,
        shard: tuple[int, int] = (0, 1), progress: bool = True) -> StageResult:
    from meg import fit
    from meg.editor import build_blocklist, template_bank

    t0 = time.time()
    cfg = config.meg_config(view)
    edits = read_edits(Path(prepare_dir) / "edits.jsonl")
    i, n = shard
    mine = [e for e in edits if shard_of(e.content_key, n) == i]
    pool = read_edits(Path(prepare_dir) / "pseudo.jsonl") if cfg.fit.uses_bank else []
    loaded = load_base(view)
    layer = cfg.fit.layer if cfg.fit.layer is not None else loaded.default_layer
    store_dir = Path(cache_dir) / "fit" if cache_dir else None
    bank = template_bank(cfg, pool, edits, build_blocklist(edits), read_rewordings(prepare_dir)) \
        if cfg.fit.uses_bank else None
    cached = set()
    if store_dir is not None:
        cached = set(fit.WeightStore(store_dir / cfg.fit.key(loaded.content_hash, layer)).load())
    prefixes = fit.context_prefixes(loaded, cfg.fit.n_prefixes, cfg.fit.prefix_tokens, cfg.fit.seed)
    n_new = sum(fit.store_key(e, *fit.edit_rows(e, bank, cfg.fit, prefixes)) not in cached for e in mine)
    if progress:
        print(f"fit: shard {i}/{n}: {len(mine)} edits, {n_new} to fit, {len(mine) - n_new} cached", flush=True)
    res = fit.fit_edits(loaded, mine, cfg.fit, store_dir=store_dir, progress=progress, bank=bank)
    report = res.report()
    tensors = {"weights": res.weights, "w0": res.w0, "success": res.success, "steps": res.steps, "loss": res.loss}
    _write(Path(out_dir), res.ids, res.keys, res.layer, tensors, report,
           {"shard": [i, n], "n_fitted": n_new, "n_cached": len(mine) - n_new, "model_hash": loaded.content_hash,
            "contexts": [res.contexts[k] for k in res.keys]})
    metrics = {k: float(report[k]) for k in ("success_rate", "steps_median", "steps_max", "delta_norm_mean")}
    metrics.update(n_edits=float(len(mine)), n_fitted=float(n_new), n_cached=float(len(mine) - n_new),
                   seconds=time.time() - t0)
    write_metrics(out_dir, metrics)
    return StageResult(
        "fit", config.flat(view), metrics, [Path(out_dir) / "fit.json"], tags={"meg.shard": f"{i}/{n}"},
        summary=f"{len(mine)} edits at layer {res.layer}: {report['n_success']} fitted exactly, "
                f"{n_new} fitted now, {len(mine) - n_new} from the cache",
    )


def merge(prepare_dir: Path, shard_dirs: list[Path], out_dir: Path, params: dict | None = None) -> StageResult:
    """Put the shards' weights back in the order of the edit set; every edit exactly once."""
    edits = read_edits(Path(prepare_dir) / "edits.jsonl")
    rows: dict[str, tuple[dict, int, dict]] = {}
    layers, models, w0 = set(), set(), None
    n_fitted = n_finished = 0
    for d in shard_dirs:
        meta, tensors = read(d)
        layers.add(meta["layer"])
        models.add(meta.get("model_hash", ""))
        n_fitted += meta.get("n_fitted", 0)
        n_finished += meta.get("report", {}).get("n_finished", 0)
        if w0 is not None and not torch.equal(w0, tensors["w0"]):
            raise BundleError(f"{d}: fitted from another initialisation w0 than the other shards")
        w0 = tensors["w0"]
        for j, key in enumerate(meta["keys"]):
            if key in rows:
                raise BundleError(f"{d}: edit {meta['ids'][j]} is also in another shard")
            rows[key] = (meta, j, tensors)
    missing = [e.id for e in edits if e.content_key not in rows]
    if missing:
        raise BundleError(f"fit merge: {len(missing)} edits are in no shard (e.g. {missing[0]}); "
                          "did every shard finish?")
    if len(layers) != 1 or len(models) != 1:
        raise BundleError(f"fit merge: shards fitted at different layers {sorted(layers)} or on different base models")
    order = [rows[e.content_key] for e in edits]
    merged = {name: torch.stack([t[name][j] for _, j, t in order]) for name in TENSORS if name != "w0"}
    merged["w0"] = w0
    from meg.fit import FitResult

    res = FitResult([e.id for e in edits], [e.content_key for e in edits], merged["weights"], w0,
                    merged["success"], merged["steps"], merged["loss"], layers.pop(), 0.0,
                    n_finished=n_finished)
    report = res.report()
    contexts = [m.get("contexts", [[]] * len(m["keys"]))[j] for m, j, _ in order]
    _write(Path(out_dir), res.ids, res.keys, res.layer, merged, report,
           {"shards": len(shard_dirs), "n_fitted": n_fitted, "n_cached": len(edits) - n_fitted,
            "model_hash": models.pop(), "contexts": contexts})
    metrics = {k: float(report[k]) for k in ("success_rate", "steps_median", "steps_max", "delta_norm_mean")}
    metrics.update(n_edits=float(len(edits)), n_fitted=float(n_fitted))
    write_metrics(out_dir, metrics)
    return StageResult("fit", params or {}, metrics, [Path(out_dir) / "fit.json"],
                       tags={"meg.shards": str(len(shard_dirs))},
                       summary=f"merged {len(shard_dirs)} shards: {len(edits)} edits, "
                               f"{report['n_success']} fitted exactly")
