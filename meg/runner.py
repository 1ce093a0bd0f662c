"""Running the stages on one machine: the directory layout, MLflow around each stage, and the demo.

Layout (relative to the repository root, all git-ignored):

    artifacts/<stage>/   what each stage writes; DVC outputs, replaced on every run of the stage
    cache/               state that must outlive ``dvc repro`` and is never a DVC output: the
                         per-edit fit cache, the encoders by setting, the last generator (warm
                         start) and its checkpoints, the base model's locality answers
    mlflow.db, mlartifacts/   the default MLflow store

``run_stage`` is what ``meg <stage>`` (and so ``dvc repro``) calls. ``demo`` is ``make demo``: it
restores the raw facts, opens the pipeline's MLflow run, runs ``dvc repro`` with the stage runs
nested under it, and prints where everything is. DVC is run as a program, never imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from meg import config
from meg.errors import ConfigError, MegError
from meg.stages import StageResult


JOB_TAG = "meg.kfp_job_id"  # the tag linking a Kubeflow job's MLflow runs


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    def out(self, stage: str) -> Path:
        return self.root / "artifacts" / stage

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def bundle(self) -> Path:
        return self.out("attach") / "bundle"


def _call(stage: str, view: dict, layout: Layout, progress: bool, shard: tuple[int, int] | None,
          out: Path | None, registry=None) -> StageResult:
    from meg import stages  # noqa: F401  (the stage modules below)
    from meg.stages import attach, encoder, evaluate, fit, generator, prepare, promote, router

    L = layout
    o = Path(out) if out else L.out(stage)
    if stage == "prepare":
        return prepare.run(view, o, root=L.root, cache_dir=L.cache, progress=progress)
    if stage == "fit":
        return fit.run(view, L.out("prepare"), o, L.cache, shard or (0, 1), progress)
    if stage == "encoder":
        return encoder.run(view, L.out("prepare"), o, L.cache, progress)
    if stage == "router":
        return router.run(view, L.out("prepare"), L.out("encoder"), o, progress)
    if stage == "generator":
        return generator.run(view, L.out("prepare"), L.out("fit"), L.out("encoder"), o, L.cache, progress)
    if stage == "attach":
        return attach.run(view, L.out("prepare"), L.out("fit"), L.out("encoder"), L.out("router"),
                          L.out("generator"), o)
    if stage == "evaluate":
        return evaluate.run(view, L.out("prepare"), L.bundle, o)
    if stage == "promote":
        return promote.run(view, L.out("prepare"), L.out("evaluate"), L.bundle, o, registry)
    raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(config.STAGES)}")


def run_stage(stage: str, params_path: str | Path = "params.yaml", root: str | Path = ".", progress: bool = True,
              shard: tuple[int, int] | None = None, out: Path | None = None) -> StageResult:
    """Run one stage with the settings it reads, logged as an MLflow run nested under the pipeline's."""
    from meg import tracking

    layout = Layout(Path(root))
    view = config.stage_view(config.load_params(params_path), stage)
    clock = _Clock()
    if not tracking.enabled():
        if stage == "promote":
            raise ConfigError("promote needs the MLflow model registry, but tracking is off (MEG_TRACKING=off)")
        result = _call(stage, view, layout, progress, shard, out)
        result.metrics.update(clock.read())
    else:
        tracking.configure(layout.root)
        registry = tracking.Registry(config.section_config(view, "promote").model_name) if stage == "promote" else None
        tags = {"meg.shard": f"{shard[0]}/{shard[1]}"} if shard else None
        with tracking.stage_run(stage, config.flat(view), tags=tags):
            result = _call(stage, view, layout, progress, shard, out, registry)
            result.metrics.update(clock.read())
            tracking.log_result(result)
    m = result.metrics
    print(f"{stage}: {result.summary} [{m['wall_seconds']:.0f} s, {m['cpu_seconds']:.0f} CPU s]", flush=True)
    return result


class _Clock:
    """Wall and CPU time (user + system, all threads) of this process since creation: on a shared
    machine the CPU time says what a stage costs when the wall time mostly says how busy the machine was."""

    def __init__(self):
        self.wall, self.cpu = time.time(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def read(self) -> dict[str, float]:
        return {"wall_seconds": time.time() - self.wall, "cpu_seconds": self._cpu() - self.cpu}


def component_stage(stage: str, params_text: str, tracking_uri: str, job_id: str, call,
                    metrics_artifact=None, device: str = "") -> StageResult:
    """A stage inside a Kubeflow component: settings from YAML text, MLflow at ``tracking_uri``.

    ``call(view, registry)`` runs the stage on the component's artifact paths. Its MLflow run nests
    under the pipeline run tagged with the Kubeflow job id ``job_id`` (found by tag rather than
    passed from task to task: kfp's local runner hands a ParallelFor body the loop item in place of
    an upstream task's output). With an empty ``tracking_uri`` nothing is logged (and promotion,
    which needs the registry, refuses to run). ``device`` (when given) replaces ``base.device``,
    e.g. for the one step that gets a GPU.
    """
    from meg import tracking

    view = config.stage_view(config.parse_params(params_text, "pipeline parameter 'params'"), stage)
    if device and "base" in view:
        view["base"]["device"] = device
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    else:
        os.environ["MEG_TRACKING"] = "off"
    if not tracking.enabled():
        if stage == "promote":
            raise ConfigError("promote needs the MLflow model registry: give the pipeline a tracking_uri")
        result = call(view, None)
    else:
        tracking.configure(Path.cwd())
        registry = tracking.Registry(config.section_config(view, "promote").model_name) if stage == "promote" else None
        parent = tracking.find_pipeline_run(JOB_TAG, job_id) if job_id else None
        with tracking.stage_run(stage, config.flat(view), parent_run_id=parent, tags={JOB_TAG: job_id}):
            result = call(view, registry)
            tracking.log_result(result)
    if metrics_artifact is not None:
        for name, value in result.metrics.items():
            metrics_artifact.log_metric(name, float(value))
    print(f"{stage}: {result.summary}", flush=True)
    return result


def merge_fit(shard_dirs: list[Path], params_path: str | Path = "params.yaml", root: str | Path = ".",
              out: Path | None = None) -> StageResult:
    from meg.stages import fit

    layout = Layout(Path(root))
    view = config.stage_view(config.load_params(params_path), "fit")
    result = fit.merge(layout.out("prepare"), [Path(d) for d in shard_dirs], out or layout.out("fit"),
                       config.flat(view))
    print(f"fit: {result.summary}", flush=True)
    return result


# ---------------------------------------------------------------------------------- demo


def _dvc(args: list[str], root: Path, env: dict) -> int:
    """Run ``dvc`` from this interpreter's environment (the venv's bin first on PATH for its stages)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**env, "PATH": bin_dir + os.pathsep + env.get("PATH", "")}
    return subprocess.call([sys.executable, "-m", "dvc", *args], cwd=root, env=env)


def repro(root: str | Path = ".", dvc_args: list[str] | None = None, name: str = "pipeline") -> int:
    """``dvc repro`` with its stage runs nested under one MLflow pipeline run."""
    from meg import tracking

    root = Path(root).resolve()
    env = dict(os.environ)
    run_id = None
    if tracking.enabled():
        tracking.configure(root)
        run_id = tracking.start_pipeline_run(name)
        env[tracking.PARENT_ENV] = run_id
    code = 1
    try:
        code = _dvc(["repro", *(dvc_args or [])], root, env)
    finally:
        if run_id:
            tracking.end_pipeline_run(run_id, code == 0)
    return code


def demo(root: str | Path = ".") -> int:
    """The main job: restore the raw facts, run the pipeline, print where the results are."""
    from meg.data import restore_raw_data

    root = Path(root).resolve()
    t0 = time.time()
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(f"{root}: no dvc.yaml here; run the demo from the repository root")
    written = restore_raw_data(root / "data")
    print(f"meg demo: raw facts in {root / 'data'} ({written} files restored)", flush=True)
    code = repro(root, name="demo")
    if code != 0:
        raise MegError(f"dvc repro failed (exit {code}); fix the error above and run `make demo` again "
                       "(finished stages are not rerun)")
    _dvc(["plots", "show", "-q"], root, dict(os.environ))
    print(summary(root, time.time() - t0), flush=True)
    return 0


def summary(root: Path, seconds: float | None = None) -> str:
    """Where the results, plots, bundle and MLflow UI are, with the headline numbers."""
    layout = Layout(root)
    lines = ["", "=" * 78, "meg demo: done" + (f" in {seconds / 60:.1f} min" if seconds else "")]
    metrics_path = layout.out("evaluate") / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        lines.append(f"{'method':<8} {'Score':>6} {'Rel':>6} {'Gen':>6} {'Loc':>6}   (AG, %)")
        for name, m in metrics.items():
            lines.append(f"{name:<8} {m.get('score', 0):>6.1f} {m.get('rel_ag', 0):>6.1f} {m.get('gen_ag', 0):>6.1f} "
                         f"{m.get('loc_ag', 0):>6.1f}")
    decision_path = layout.out("promote") / "decision.json"
    if decision_path.is_file():
        d = json.loads(decision_path.read_text())
        lines.append(f"promotion: version {d['candidate_version']} "
                     f"{'promoted' if d['promoted'] else 'not promoted'}: {'; '.join(d['reasons'])}")
    db = root / "mlflow.db"
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{db}"
    try:
        promote_cfg = config.section_config(config.load_params(root / "params.yaml"), "promote")
        model = f"models:/{promote_cfg.model_name}@{promote_cfg.alias}"
    except MegError:
        model = "models:/meg-editor@champion"
    lines += [
        f"metrics:   {metrics_path}  (dvc metrics show)",
        f"table:     {layout.out('evaluate') / 'table.txt'}",
        f"plots:     {root / 'dvc_plots' / 'index.html'}  (dvc plots show), "
        f"{layout.out('evaluate') / 'comparison.png'}, {layout.out('generator') / 'curve.png'}",
        f"bundle:    {layout.bundle}",
        f"MLflow UI: mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000",
        f"serve:     MLFLOW_TRACKING_URI={uri} mlflow models serve -m {model} --env-manager local -p 5001",
        "=" * 78,
    ]
    return "\n".join(lines)
