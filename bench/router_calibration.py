"""Query encoder and router: settings measured on held-out pseudo-edits, router confusion reported.

    python -m bench.router_calibration --out results/router_calibration.json
    python -m bench.router_calibration --sweep --out results/encoder_sweep.json

Protocol. Everything learned or chosen (encoder fine-tuning, its settings, router thresholds) uses
only the CounterFact *train* split, after dropping every train record whose subject, prompt or
paraphrase also occurs in the CounterFact edit split or ZsRE (and ignoring train locality prompts
that occur there). The remaining records are split by subject into an encoder pool (fine-tuning),
a dev part (``--sweep``: recall@1 among 1000 originals, cosine separation) and a calibration part
(pseudo-edits whose paraphrases and locality prompts the encoder never saw).

Report (default mode). For the first N edits of CounterFact (1000) and ZsRE (1037), frozen and tuned
encoder, both routers: the threshold is calibrated on N train pseudo-edits (ZsRE has no train split,
so its router is calibrated on CounterFact train pseudo-edits too), the router is fitted on the
edits' ``prompt`` field only, and only then the edits' paraphrases and locality prompts are routed
to report the confusion: share of edit prompts / paraphrases (also: routed to their own edit) /
locality prompts routed.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from meg.encoder import EncoderConfig, QueryEncoder, retrieval_metrics
from meg.router import PseudoEdits, RouterConfig, build_router, calibrate_router, make_router

DATA = Path(__file__).resolve().parents[1] / "meg" / "datasets"


# ---- data -------------------------------------------------------------------------------------


def _json(rel: str) -> list[dict]:
    return json.loads((DATA / rel).read_text())


def edit_sets(n_cf: int, n_zsre: int) -> dict[str, dict[str, list[str]]]:
    """The evaluated edit sets: prompts (fitted), paraphrases and locality prompts (report only)."""
    cf = _json("counterfact/easyedit_counterfact-edit.json")[:n_cf]
    zs = _json("zsre/zsre_mend_eval_portability_gpt4.json")[:n_zsre]
    return {
        "counterfact": {"prompt": [r["prompt"] for r in cf], "paraphrase": [r["rephrase_prompt"] for r in cf],
                        "locality": [r["locality_prompt"] for r in cf]},
        "zsre": {"prompt": [r["src"] for r in zs], "paraphrase": [r["rephrase"] for r in zs],
                 "locality": [r["loc"] for r in zs]},
    }


def evaluation_texts() -> tuple[set[str], set[str]]:
    """Every text and subject of the full CounterFact edit split and ZsRE (for decontamination)."""
    cf = _json("counterfact/easyedit_counterfact-edit.json")
    zs = _json("zsre/zsre_mend_eval_portability_gpt4.json")
    texts = {r[f] for r in cf for f in ("prompt", "rephrase_prompt", "locality_prompt")}
    texts |= {r[f] for r in zs for f in ("src", "rephrase", "loc")}
    return texts, {r["subject"] for r in cf} | {r["subject"] for r in zs}


def train_split(n_dev: int = 1000, n_calibration: int = 2000, seed: int = 0) -> dict[str, list[dict]]:
    """Decontaminated CounterFact train records, split by subject into encoder / dev / calibration."""
    texts, subjects = evaluation_texts()
    records = []
    for r in _json("counterfact/easyedit_counterfact-train.json"):
        if r["subject"] in subjects or r["prompt"] in texts or r["rephrase_prompt"] in texts:
            continue
        loc = r["locality_prompt"] if r["locality_prompt"] not in texts else None
        records.append({"prompt": r["prompt"], "paraphrase": r["rephrase_prompt"], "locality": loc,
                        "subject": r["subject"]})
    by_subject: dict[str, list[dict]] = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r)
    groups = list(by_subject.values())
    random.Random(seed).shuffle(groups)
    ordered = [r for g in groups for r in g]
    # a subject's records stay together; the cuts fall on group boundaries
    cuts, total, bounds = [], 0, [n_calibration, n_calibration + n_dev]
    for g in groups:
        total += len(g)
        if bounds and total >= bounds[0]:
            cuts.append(total)
            bounds.pop(0)
    calibration, dev, encoder = ordered[: cuts[0]], ordered[cuts[0] : cuts[1]], ordered[cuts[1] :]
    return {"encoder": encoder, "dev": dev, "calibration": calibration}


# ---- embedding cache --------------------------------------------------------------------------


class CachedEncoder:
    """encode(texts) with a per-text cache, so each text is embedded once per encoder."""

    def __init__(self, encoder: QueryEncoder):
        self.encoder, self.cache = encoder, {}
        self.seconds = 0.0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            t0 = time.perf_counter()
            for t, e in zip(missing, self.encoder.encode(missing)):
                self.cache[t] = e
            self.seconds += time.perf_counter() - t0
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.zeros(0, self.encoder.dim)


def tune_encoder(config: EncoderConfig, pool: list[dict], n_pairs: int, hard: bool) -> tuple[QueryEncoder, dict]:
    encoder = QueryEncoder(config)
    pairs = pool[:n_pairs]
    t0 = time.perf_counter()
    losses = encoder.finetune([r["prompt"] for r in pairs], [r["paraphrase"] for r in pairs],
                              [r["locality"] for r in pairs] if hard else None, progress=False)
    info = {"seconds": time.perf_counter() - t0, "steps": len(losses), "pairs": len(pairs),
            "first_loss": losses[0] if losses else None, "last_loss": sum(losses[-5:]) / 5 if losses else None}
    return encoder, info


def dev_metrics(encode: CachedEncoder, dev: list[dict]) -> dict[str, float]:
    dev = dev[:1000]
    orig, para = encode([r["prompt"] for r in dev]), encode([r["paraphrase"] for r in dev])
    unrelated = encode([r["locality"] for r in dev if r["locality"]])
    return retrieval_metrics(orig, para, unrelated)


# ---- the two modes ----------------------------------------------------------------------------

LAST, ALL = {"trainable": "last", "lr": 1e-4}, {"trainable": "all", "lr": 3e-5}
SWEEP = [  # name, EncoderConfig overrides, hard negatives
    ("frozen", {"trainable": "none"}, False),
    ("last T=1.0", {**LAST, "temperature": 1.0}, False),
    ("last T=0.1", {**LAST, "temperature": 0.1}, False),
    ("last T=0.05", {**LAST, "temperature": 0.05}, False),
    ("last T=0.02", {**LAST, "temperature": 0.02}, False),
    ("last T=0.05 +hard", {**LAST, "temperature": 0.05}, True),
    ("all T=0.05 +hard", {**ALL, "temperature": 0.05}, True),
    ("all T=0.05 +hard sym", {**ALL, "temperature": 0.05, "symmetric": True}, True),
    ("all T=0.1 +hard", {**ALL, "temperature": 0.1}, True),
]


def sweep(args: argparse.Namespace) -> dict:
    split = train_split()
    results = {}
    only = set(args.only.split(",")) if args.only else None
    for name, overrides, hard in SWEEP:
        if only and name not in only:
            continue
        encoder, info = tune_encoder(EncoderConfig(**overrides), split["encoder"], args.pairs, hard)
        metrics = dev_metrics(CachedEncoder(encoder), split["dev"])
        results[name] = {"config": overrides, "hard_negatives": hard, **info, **metrics}
        print(f"{name:24s} R@1 {metrics['recall_at_1']:.3f}  own {metrics['own_cos']:.3f}  "
              f"unrel {metrics['unrelated_nearest_cos']:.3f}  sep {metrics['separation']:.3f}  "
              f"AUC {metrics['auc']:.3f}  ({info['seconds']:.0f} s, {info['steps']} steps)", flush=True)
    return {"split": {k: len(v) for k, v in split.items()}, "pairs": args.pairs, "results": results}


def report(args: argparse.Namespace) -> dict:
    split = train_split()
    calib = split["calibration"]
    pseudo = PseudoEdits(
        prompts=tuple(r["prompt"] for r in calib),
        paraphrases=tuple(r["paraphrase"] for r in calib),
        unrelated=tuple(r["locality"] for r in calib if r["locality"]),
        filler=tuple(r["prompt"] for r in split["encoder"]),
    )
    sets = edit_sets(args.n_counterfact, args.n_zsre)
    out: dict = {"split": {k: len(v) for k, v in split.items()}, "encoders": {}, "runs": {}}
    hard = not args.no_hard
    for enc_name in args.encoders.split(","):
        if enc_name == "frozen":
            t0 = time.perf_counter()
            encoder, info = QueryEncoder(EncoderConfig(trainable="none")), {"seconds": 0.0}
            info["load_seconds"] = time.perf_counter() - t0
        elif args.encoder_cache and (args.encoder_cache / "encoder.json").is_file():
            encoder = QueryEncoder.load(args.encoder_cache)
            info = json.loads((args.encoder_cache / "tuning.json").read_text())
        else:
            encoder, info = tune_encoder(EncoderConfig(), split["encoder"], args.pairs, hard)
            info.update(config=asdict(encoder.config), hard_negatives=hard)
            if args.encoder_cache:
                encoder.save(args.encoder_cache)
                (args.encoder_cache / "tuning.json").write_text(json.dumps(info, indent=2))
        encode = CachedEncoder(encoder)
        info["dev"] = dev_metrics(encode, split["dev"])
        out["encoders"][enc_name] = info
        print(f"encoder {enc_name}: fine-tune {info['seconds']:.0f} s, dev {info['dev']}", flush=True)
        for dataset, edits in sets.items():
            n = len(edits["prompt"])
            idx = torch.arange(n)
            for kind in ("nearest", "familiarity"):
                config = RouterConfig(kind=kind)
                encode(edits["prompt"] + list(pseudo.prompts[:n]))  # embed first: time the routers alone
                t0 = time.perf_counter()
                cal = calibrate_router(config, encode, pseudo, n, exclude=edits["prompt"])
                t_cal = time.perf_counter() - t0
                config.threshold = cal.threshold
                t0 = time.perf_counter()
                router = make_router(config).fit(encode(edits["prompt"]))
                t_fit = time.perf_counter() - t0
                # evaluation prompts are embedded and routed only now, after every choice is made
                conf = router.confusion(encode(edits["prompt"]), encode(edits["paraphrase"]),
                                        encode(edits["locality"]), idx)
                key = f"{enc_name}/{dataset}/{kind}"
                out["runs"][key] = {"threshold": cal.threshold, "calibration": asdict(cal), "confusion": conf,
                                    "calibrate_seconds": t_cal, "fit_seconds": t_fit, "n_edits": n}
                print(f"{key:32s} thr {cal.threshold:.4f} | pseudo: edit {cal.edit_recall:.3f} para {cal.recall:.3f} "
                      f"unrel {1 - cal.rejection:.3f} | edit {conf['edit_routed']:.3f} "
                      f"para {conf['paraphrase_routed']:.3f} "
                      f"(right {conf['paraphrase_routed_right']:.3f}) loc {conf['unrelated_routed']:.3f} | "
                      f"fit {t_fit:.1f} s, calibrate {t_cal:.1f} s", flush=True)
        out["encoders"][enc_name]["encode_seconds"] = encode.seconds
    return out


def table(out: dict) -> str:
    rows = ["| encoder | dataset | router | threshold | edit routed | paraphrase routed | routed to own edit | "
            "locality routed | fit s |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in out["runs"].items():
        enc, ds, kind = key.split("/")
        c = r["confusion"]
        rows.append(f"| {enc} | {ds} | {kind} | {r['threshold']:.4f} | {100 * c['edit_routed']:.1f} | "
                    f"{100 * c['paraphrase_routed']:.1f} | {100 * c['paraphrase_routed_right']:.1f} | "
                    f"{100 * c['unrelated_routed']:.1f} | {r['fit_seconds']:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sweep", action="store_true", help="compare encoder settings on the dev part instead")
    p.add_argument("--only", default="", help="--sweep: comma-separated names of settings to run")
    p.add_argument("--pairs", type=int, default=4000, help="fine-tuning pairs from the encoder pool")
    p.add_argument("--no-hard", action="store_true", help="fine-tune without hard negatives")
    p.add_argument("--encoders", default="frozen,tuned", help="which of frozen,tuned to report")
    p.add_argument("--encoder-cache", type=Path, default=None,
                   help="directory of the tuned encoder: loaded if present, else written after tuning")
    p.add_argument("--n-counterfact", type=int, default=1000)
    p.add_argument("--n-zsre", type=int, default=1037)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = sweep(args) if args.sweep else report(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    if not args.sweep:
        print(table(out))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
