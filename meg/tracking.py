"""The only module that talks to MLflow.

Default store: a local SQLite database ``<root>/mlflow.db`` with artifacts under
``<root>/mlartifacts``; ``MLFLOW_TRACKING_URI`` (a tracking server) overrides it.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

EXPERIMENT = "meg"


def configure(root: str | Path, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns the tracking URI."""
    import mlflow

    root = Path(root).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (root / "mlartifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    return uri


@contextmanager
def run(name: str, params: dict | None = None, nested: bool = False, tags: dict | None = None) -> Iterator[str]:
    """An MLflow run; yields its id."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=nested, tags=tags) as active:
        if params:
            log_params(params)
        yield active.info.run_id


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_params(params: dict) -> None:
    import mlflow

    flat = {k: (str(v)[:500] if v is not None else "None") for k, v in _flatten(params).items()}
    mlflow.log_params(flat)


def log_metrics(metrics: dict, step: int | None = None) -> None:
    import mlflow

    clean = {k: float(v) for k, v in _flatten(metrics).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)
