"""Editing quality side by side: every method on the same model, edits and metrics.

    python -m bench.quality --dataset counterfact --n-edits 256 --methods none,ft --out OUT.json
    python -m bench.quality --facts my_facts.jsonl --methods none,ft,meg --out OUT.json
    python -m bench.quality --dataset counterfact --n-edits 1000 --methods meg --work-dir /tmp/w \\
        --variant meg-mlp:generator.denoiser=mlp --variant meg-frozen:encoder.trainable=none --out OUT.json

Edits are applied as one batch, then every edit is evaluated (protocol: meg.evaluate; ``--protocol chat``:
every probe asked as a user turn, meg.evaluate.evaluate_chat), or with ``--eval-edits M`` the first M of them
(large scale series: the same questions at every size). Nothing the evaluation asks is fitted, trained or
calibrated on (meg.probes); ``details.NAME.leaks`` counts what would break that, and is 0 in a clean run. Writes
OUT.json ({"protocol", "model", "dataset", "n_edits", "n_evaluated", "methods": {NAME: metrics},
"details": {NAME: ...}}, percentages 0-100; ``cf_score`` is CounterFact's HM(ES, PS, NS)), the per-edit outputs beside it (OUT.records.jsonl.gz), a self-contained HTML report
(OUT.html, plots in OUT_plots/; meg.report), and prints a table. With --mlflow ROOT (or
MLFLOW_TRACKING_URI set) the metrics and the report are logged to one MLflow run.

MeG settings: ``--set KEY=VALUE`` changes the ``meg`` method (dotted keys of meg.editor.MegConfig,
e.g. ``fit.layer=28``, ``router=familiarity``, ``router_options.subject_gate=true``,
``generator.sample_steps=10``); ``--variant NAME:KEY=VALUE,KEY=VALUE`` adds a MeG method with those
changes on top. ``--work-dir`` keeps fitted weights and generator checkpoints between runs, so
variants that share them (and reruns) do not recompute them. ``--fit-shard I/N`` only fits shard I of N
and stops, so N processes fit a large edit set on N cores before the evaluating run: MeG's neurons
into the work dir, MEMIT's and AlphaEdit's target residuals z and GRACE's values (shard I of its
codebook's entries) into their stores under $MEG_HOME:

    for i in 0 1; do python -m bench.quality --dataset counterfact --n-edits 10000 --methods meg \
        --work-dir W --threads 1 --fit-shard $i/2 & done; wait
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from meg import facts, lm
from meg.benchmark import locality_labels, run_methods
from meg.editors import EDITORS, make_editor
from meg.errors import ConfigError
from meg.report import write_report

SHARDED = ("meg", "memit", "alphaedit", "grace")  # the methods --fit-shard fits


def _value(text: str):
    """A setting's value: JSON where it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_settings(text: str, what: str) -> dict:
    """"KEY=VALUE,KEY=VALUE" -> {key: value}; ArgumentTypeError naming `what` on a malformed item."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(value.strip())
    return out


def parse_variants(items: list[str], reserved=()) -> dict[str, dict]:
    """--variant "NAME:KEY=VALUE,..." arguments -> {name: settings}; a malformed, repeated or reserved name
    raises ArgumentTypeError."""
    out: dict[str, dict] = {}
    for v in items:
        name, sep, settings = v.partition(":")
        if not sep or not name or name in reserved or name in out:
            raise argparse.ArgumentTypeError(f"--variant {v!r}: expected a new NAME:KEY=VALUE,...")
        out[name] = parse_settings(settings, f"--variant {name}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["counterfact", "zsre"])
    src.add_argument("--facts", type=Path, help="any fact file the readers accept")
    p.add_argument("--n-edits", type=int, default=256, help="the first N edits of the set")
    p.add_argument("--methods", default="none,ft", help=f"comma-separated, from {','.join(EDITORS)}")
    p.add_argument("--eval-edits", type=int, default=None, metavar="M",
                   help="ask the questions of the first M edits only (all N are applied); default all")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="an extra MeG method with these settings changed (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of the meg method")
    p.add_argument("--work-dir", type=Path, default=None, help="keep MeG's fitted weights and checkpoints here")
    p.add_argument("--model", default=lm.DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=None, help="the results JSON (required unless --fit-shard)")
    p.add_argument("--fit-shard", default=None, metavar="I/N",
                   help="only fit shard I of N of the edits, then stop (meg: neurons into --work-dir; memit, "
                        "alphaedit: z into their store): run the N shards at once (one per core), then the "
                        "evaluating run finds every edit fitted")
    p.add_argument("--protocol", choices=["ag", "chat"], default="ag",
                   help="ag: complete each probe (20 tokens, first line, exact match); chat: ask it as a user turn of "
                        "the chat template (40 tokens to the end of the turn, the target stated as a whole word)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mlflow", type=Path, default=None, help="log metrics and the report to the MLflow store here")
    args = p.parse_args(argv)
    for m in filter(None, args.methods.split(",")):
        if m not in EDITORS:
            p.error(f"unknown method {m!r}; choose from {', '.join(EDITORS)}")
    if args.n_edits < 1:
        p.error("--n-edits must be >= 1")
    if args.fit_shard is not None:
        named = list(filter(None, args.methods.split(",")))
        # the methods the shard fits, meg first when only variants of it are asked for
        args.shard_methods = (["meg"] if args.variant and "meg" not in named else []) + \
            [m for m in named if m in SHARDED]
        if not args.shard_methods:
            p.error(f"--fit-shard fits the methods {', '.join(SHARDED)}; none is in --methods")
        if "meg" in args.shard_methods and args.work_dir is None:
            p.error("--fit-shard needs --work-dir (the fit store the shards share)")
    if args.fit_shard is None and args.out is None:
        p.error("--out is required")
    if args.eval_edits is not None and not 1 <= args.eval_edits:
        p.error("--eval-edits must be >= 1")
    try:
        args.meg_settings = parse_settings(",".join(args.set), "--set")
        args.variants = parse_variants(args.variant, reserved=EDITORS)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    return args


def editor_factory(args: argparse.Namespace):
    from meg.editor import MegConfig, MegEditor, with_overrides

    base = with_overrides(MegConfig(), args.meg_settings)

    def make(name: str):
        if name == "meg" or name in args.variants:
            cfg = with_overrides(base, args.variants.get(name, {}))
            return MegEditor(cfg, work_dir=args.work_dir)
        return make_editor(name)

    return make


def fit_shard(args: argparse.Namespace, shard: tuple[int, int], loaded, edits: list) -> int:
    """Fit the edits of shard (i, n) (by content key, as ``meg fit --shard``), exactly as the evaluating run
    would fit them: with the meg method's settings into the work dir's fit store, the z of MEMIT and
    AlphaEdit (registry settings) into their store, and GRACE's values of entry shard (i, n) of the
    codebook of all the edits (its entries depend on every edit) into its store."""
    from meg.stages.fit import shard_of

    i, n = shard
    mine = [e for e in edits if shard_of(e.content_key, n) == i]
    for method in args.shard_methods:
        print(f"bench.quality: {method}: fitting shard {i}/{n}: {len(mine)} of {len(edits)} edits", flush=True)
        t0 = time.time()
        if method == "meg":
            from meg import fit
            from meg.editor import MegConfig, build_data, with_overrides

            cfg = with_overrides(MegConfig(), args.meg_settings)
            bank = build_data(loaded, edits, cfg).bank  # the evaluating run's: its probes are the edits' own
            report = fit.fit_edits(loaded, mine, cfg.fit, store_dir=args.work_dir / "fit", bank=bank).report()
        elif method == "grace":
            report = f"{make_editor(method).store_values(loaded, edits, shard)} values of shard {i}/{n} stored"
        else:
            report = f"{make_editor(method).store_targets(loaded, mine)} z stored"
        print(f"bench.quality: {method}: shard {i}/{n} fitted in {time.time() - t0:.0f} s: {report}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shard = None
    if args.fit_shard is not None:
        from meg.stages.fit import parse_shard

        try:
            shard = parse_shard(args.fit_shard)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset:
        dataset, edits = args.dataset, facts.load_benchmark(args.dataset, "edit")
    else:
        dataset, edits = str(args.facts), facts.read_facts(args.facts)
    edits = edits[: args.n_edits]
    loaded = lm.load_model(args.model)
    if shard is not None:
        try:
            return fit_shard(args, shard, loaded, edits)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    methods = [m for m in args.methods.split(",") if m] + list(args.variants)
    print(f"bench.quality: {len(edits)} edits from {dataset}, model {loaded.model_id}", flush=True)
    n_evaluated = min(args.eval_edits, len(edits)) if args.eval_edits else None
    if n_evaluated:
        print(f"bench.quality: the questions of the first {n_evaluated} edits are asked", flush=True)
    labels = None
    if args.work_dir:  # the pre-edit answers are kept there: a scale series asks the same questions at every size
        labels = locality_labels(loaded, edits[: n_evaluated or len(edits)], args.batch_size, args.work_dir,
                                 args.protocol)
    result = run_methods(loaded, edits, dataset, methods, args.batch_size, editor_factory=editor_factory(args),
                         labels=labels, n_evaluated=n_evaluated, protocol=args.protocol)
    records = result.write(args.out)
    report = write_report(args.out.parent, result.methods, result.records, confusion=result.extras,
                          name=args.out.stem, title=f"Knowledge editing ({args.protocol} protocol): {len(edits)} edits from {dataset}"
                          + (f", the first {n_evaluated} evaluated" if n_evaluated else ""),
                          context={"model": loaded.model_id, "dataset": dataset, "n_edits": len(edits)})
    print(result.table())
    print(f"results: {args.out}  per-edit outputs: {records}  report: {report}")
    if args.mlflow or os.environ.get("MLFLOW_TRACKING_URI"):
        from meg import tracking

        tracking.configure(args.mlflow or Path.cwd())
        with tracking.run("bench.quality", params={"model": loaded.model_id, "dataset": dataset,
                                                    "n_edits": len(edits), "methods": args.methods}):
            for name, metrics in result.methods.items():
                tracking.log_metrics({f"{name}.{k}": v for k, v in metrics.items()})
            tracking.log_artifact(args.out)
            tracking.log_artifact(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
