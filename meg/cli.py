"""The `meg` command. Each subcommand is a thin shell over a function in the library.

Subcommands register themselves through small `_add_<name>` functions below; the work they do
lives in the core modules, never here.
"""

from __future__ import annotations

import argparse
import sys

from meg.errors import ConfigError, MegError


def _add_facts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("facts", help="validate and manage fact files")
    fsub = p.add_subparsers(dest="facts_cmd", required=True)
    v = fsub.add_parser("validate", help="check a fact file; exit 0 if good, 2 with one line per problem")
    v.add_argument("file")
    v.add_argument("--format", choices=["auto", "counterfact", "zsre", "jsonl", "csv"], default="auto")
    v.set_defaults(func=_facts_validate)
    a = fsub.add_parser("add", help="validate new facts and add them to the versioned fact store (data/facts)")
    a.add_argument("file")
    a.add_argument("--format", choices=["auto", "counterfact", "zsre", "jsonl", "csv"], default="auto")
    a.add_argument("--params", default="params.yaml", help="settings naming the data directory and the edit set")
    a.add_argument("--no-dvc", action="store_true", help="do not update data.dvc (`dvc add data`)")
    a.set_defaults(func=_facts_add)


def _facts_validate(args: argparse.Namespace) -> int:
    from meg.facts import validate_file

    report = validate_file(args.file, fmt=args.format)
    for line in report.notes:
        print(line, file=sys.stderr)
    if report.problems:
        for p in report.problems:
            print(p)
        return 2
    print(f"{args.file}: {report.n_records} records, {report.n_edits} edits after de-duplication: OK")
    return 0


def _facts_add(args: argparse.Namespace) -> int:
    from pathlib import Path

    from meg import config
    from meg.factstore import FactStore
    from meg.stages.prepare import edit_set

    from meg.errors import FactsError

    cfg = config.section_config(config.load_params(args.params), "prepare")
    store = FactStore(Path(cfg.data_dir) / cfg.facts_dir)
    try:
        with store.locked():  # from reading the edit set to updating data.dvc: additions run one at a time
            return _add_locked(args, cfg, store, edit_set(cfg)[0])
    except FactsError as e:  # one line per problem, as `meg facts validate` prints them
        for problem in e.problems:
            print(problem)
        print(f"meg: {args.file}: rejected, the fact store is unchanged", file=sys.stderr)
        return 2


def _add_locked(args: argparse.Namespace, cfg, store, current: list) -> int:
    import subprocess
    from pathlib import Path

    report = store.add(args.file, current, fmt=args.format)
    for note in report.notes:
        print(note, file=sys.stderr)
    print(f"{args.file}: {report.n_read} facts: {report.n_new} new, {report.n_override} overriding, "
          f"{report.n_duplicate} duplicates")
    if report.written is None:
        print("nothing new: the fact store is unchanged")
        return 0
    print(f"added {report.written}")
    if not args.no_dvc and Path("data.dvc").is_file():
        done = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", cfg.data_dir])
        if done.returncode != 0:
            print(f"meg: error: `dvc add {cfg.data_dir}` failed; the facts are stored, run it again by hand",
                  file=sys.stderr)
            return 1
        print("data.dvc updated: commit it (git add data.dvc) and `dvc push`; then `dvc repro` fits only the new facts")
    return 0


def _add_stages(sub: argparse._SubParsersAction) -> None:
    from meg.config import STAGES

    helps = {
        "prepare": "edit set, pseudo-edits and the base model's locality answers",
        "fit": "per-edit neuron weights (cached per edit; --shard i/n for one shard)",
        "encoder": "query encoder fine-tuned on pseudo-edits",
        "router": "router fitted on the edits, threshold calibrated on pseudo-edits",
        "generator": "diffusion weight generator (warm-started when facts were added)",
        "attach": "the edit bundle (neuron attachment)",
        "evaluate": "the bundle and the baselines on every edit",
        "promote": "register the bundle; move the champion alias if it passes the gates and wins",
    }
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"pipeline stage: {helps[stage]}")
        p.add_argument("--params", default="params.yaml")
        p.add_argument("--root", default=".", help="repository root holding artifacts/ and cache/")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if stage == "fit":
            p.add_argument("--shard", default=None, help="i/n: fit only shard i of n")
            p.add_argument("--out", default=None, help="output directory (default artifacts/fit)")
        p.set_defaults(func=_stage, stage=stage)
    m = sub.add_parser("fit-merge", help="merge fit shards (written with meg fit --shard i/n --out DIR)")
    m.add_argument("shards", nargs="+")
    m.add_argument("--params", default="params.yaml")
    m.add_argument("--root", default=".")
    m.add_argument("--out", default=None)
    m.set_defaults(func=_fit_merge)


def _stage(args: argparse.Namespace) -> int:
    from meg import runner
    from meg.stages.fit import parse_shard

    shard = parse_shard(args.shard) if getattr(args, "shard", None) else None
    runner.run_stage(args.stage, args.params, args.root, progress=not args.quiet, shard=shard,
                     out=getattr(args, "out", None))
    return 0


def _fit_merge(args: argparse.Namespace) -> int:
    from meg import runner

    runner.merge_fit(args.shards, args.params, args.root, args.out)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: run the whole pipeline (dvc repro) and say where the results are")
    p.add_argument("--root", default=".")
    p.set_defaults(func=_demo)
    r = sub.add_parser("repro", help="dvc repro with the stage runs nested under one MLflow pipeline run")
    r.add_argument("--root", default=".")
    r.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed to dvc repro")
    r.set_defaults(func=_repro)


def _demo(args: argparse.Namespace) -> int:
    from meg import runner

    return runner.demo(args.root)


def _repro(args: argparse.Namespace) -> int:
    from meg import runner

    return runner.repro(args.root, args.dvc_args)


def _add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="the pipeline settings (params.yaml)")
    psub = p.add_subparsers(dest="params_cmd", required=True)
    c = psub.add_parser("check", help="validate a params file")
    c.add_argument("file", nargs="?", default="params.yaml")
    c.set_defaults(func=_params_check)
    d = psub.add_parser("defaults", help="print params.yaml with every key at the library default (full size)")
    d.set_defaults(func=_params_defaults)


def _params_check(args: argparse.Namespace) -> int:
    from meg import config

    config.load_params(args.file)
    print(f"{args.file}: OK")
    return 0


def _params_defaults(args: argparse.Namespace) -> int:
    import yaml

    from meg import config

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):  # "\n" rather than a quoted line break
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

    Dumper.add_representer(str, text)
    print(yaml.dump(config.default_params(), Dumper=Dumper, sort_keys=False), end="")
    return 0


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, schedule")
    psub = p.add_subparsers(dest="pipeline_cmd", required=True)
    c = psub.add_parser("compile", help="compile the pipeline to a Kubeflow pipeline spec (YAML)")
    c.add_argument("--out", default="meg-pipeline.yaml")
    c.add_argument("--shards", type=int, default=4, help="parallel fit shards (ParallelFor)")
    c.add_argument("--params", default="params.yaml",
                   help="the settings the pipeline will run with: their generator.weights decides whether the "
                        "generator step asks for a GPU")
    c.set_defaults(func=_pipeline_compile)
    r = psub.add_parser("run-local", help="run the pipeline with kfp's local subprocess runner")
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--workdir", default="kfp-local", help="pipeline root (artifacts of every task)")
    r.add_argument("--shards", type=int, default=2)
    r.add_argument("--data-dir", default="data")
    r.add_argument("--cache-dir", default="cache", help="per-edit fit cache and warm-start state ('' for none)")
    r.set_defaults(func=_pipeline_run_local)
    s = psub.add_parser("schedule", help="create a recurring run on a Kubeflow Pipelines endpoint")
    s.add_argument("--host", required=True, help="the KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    s.add_argument("--cron", required=True, help="cron expression, 5 fields (min hour dom mon dow) or 6 with seconds")
    s.add_argument("--experiment", required=True, help="KFP experiment name (created when missing)")
    s.add_argument("--name", default="meg-retrain", help="name of the recurring run")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--shards", type=int, default=4)
    s.add_argument("--tracking-uri", default="", help="MLflow tracking server the steps log to")
    s.add_argument("--data-dir", default="", help="raw facts as mounted in the steps ('' = the packaged copies)")
    s.add_argument("--cache-dir", default="", help="persistent volume path for the fit cache and warm start")
    s.set_defaults(func=_pipeline_schedule)


def _pipeline_compile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline import compile as kcompile

    path = Path(args.params)
    if not path.is_file():
        raise ConfigError(f"{path}: no such settings file")
    weights = kcompile.weights_of(path.read_text(), str(path))
    out = kcompile.compile_pipeline(args.out, shards=args.shards, weights=weights)
    print(f"compiled {out} (generator.weights: {weights})")
    return 0


def _pipeline_run_local(args: argparse.Namespace) -> int:
    from pipeline import local

    result = local.run_local(args.params, args.workdir, shards=args.shards, data_dir=args.data_dir,
                             cache_dir=args.cache_dir)
    print(result)
    return 0


def _pipeline_schedule(args: argparse.Namespace) -> int:
    from pipeline import schedule

    info = schedule.create_recurring_run(
        host=args.host, cron=args.cron, experiment=args.experiment, name=args.name, params_path=args.params,
        shards=args.shards, tracking_uri=args.tracking_uri, data_dir=args.data_dir, cache_dir=args.cache_dir)
    print(info)
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="the raw fact sets tracked by data.dvc")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    r = dsub.add_parser("restore", help="write data/ from the copies shipped in the package (no network)")
    r.add_argument("--dest", default="data")
    r.set_defaults(func=_data_restore)


def _data_restore(args: argparse.Namespace) -> int:
    from meg.data import restore_raw_data

    written = restore_raw_data(args.dest)
    print(f"{args.dest}: {written} files restored" if written else f"{args.dest}: already complete")
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep-layers", help="reliability, paraphrase transfer and cost of the neuron per layer")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default=None, help="comma-separated; default: every third layer")
    p.add_argument("--n-edits", type=int, default=64, help="pseudo-edits from the CounterFact train split")
    p.add_argument("--optimizer", default="nesterov", choices=["nesterov", "sgd", "adam"])
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--n-variants", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    import json

    from meg import fit, lm, sweep
    from meg.augment import TemplateBank
    from meg.facts import load_benchmark

    loaded = lm.load_model(args.model)
    n = lm.num_layers(loaded.model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(2, n, 3))
    pool = load_benchmark("counterfact", "train")
    edits, rest = pool[: args.n_edits], pool[args.n_edits :]
    bank = TemplateBank.from_records(rest) if args.n_variants else None
    cfg = fit.FitConfig(optimizer=args.optimizer, lr=args.lr, n_variants=args.n_variants)
    rows = sweep.sweep_layers(loaded, edits, layers, cfg, progress=False, bank=bank)
    print(f"{'layer':>5} {'rel%':>6} {'transfer%':>9} {'spill%':>7} {'steps':>6} {'s/edit':>7}")
    for r in rows:
        print(f"{r['layer']:>5} {r['reliability']:>6.1f} {r['transfer']:>9.1f} {r['spill']:>7.1f} "
              f"{r['steps_median']:>6.0f} {r['seconds_per_edit']:>7.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": loaded.model_id, "config": vars(args) | {"func": None}, "rows": rows}, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (_add_facts, _add_data, _add_sweep, _add_stages, _add_demo, _add_params, _add_pipeline):
        add(sub)
    from meg.cli_model import add_model_commands

    add_model_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MegError as e:
        print(f"meg: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
