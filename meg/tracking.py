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
    server = os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri below exports it
    uri = server or f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = None if server else (root / "mlartifacts").as_uri()
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


def download_bundle(model_uri: str, dst: Path) -> Path:
    """Download the edit bundle of a registered pyfunc model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``).

    The pyfunc model carries the bundle as its artifact named ``bundle`` (``artifacts/bundle`` in
    the model directory; the path is read from the model's MLmodel file). Returns the local bundle
    directory under ``dst``. Unknown models, aliases or versions, and models without a bundle, raise
    BundleError naming the reference.
    """
    import yaml
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from meg.errors import BundleError

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    uri = model_uri.rstrip("/")
    try:
        mlmodel = Path(download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=str(dst / "mlmodel")))
    except (MlflowException, OSError) as e:
        raise BundleError(f"{model_uri}: cannot resolve the registered model: {e}") from e
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get("bundle")
    if entry is None:
        raise BundleError(f"{model_uri}: the model has no artifact named 'bundle' (not an edit-bundle pyfunc model)")
    rel = entry.get("path", "artifacts/bundle") if isinstance(entry, dict) else "artifacts/bundle"
    try:
        local = Path(download_artifacts(artifact_uri=f"{uri}/{rel}", dst_path=str(dst)))
    except (MlflowException, OSError) as e:
        raise BundleError(f"{model_uri}: cannot download its bundle ({rel}): {e}") from e
    if not (local / "manifest.json").is_file():
        raise BundleError(f"{model_uri}: the downloaded '{rel}' is not an edit bundle (no manifest.json)")
    return local
