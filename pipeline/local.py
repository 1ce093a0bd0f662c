"""Run the Kubeflow pipeline on this machine with kfp's local subprocess runner.

Each step runs as a subprocess of this interpreter's environment (no container, no network): the
same component code as on a cluster, the same artifacts, passed through ``pipeline_root``. The
accelerator request of the generator step has no effect locally (kfp warns), so it runs on
``generator_device`` (default cpu).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.compile import weights_of
from pipeline.dag import build

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def _step_environment() -> Iterator[None]:
    """Steps start `python3`: make it this interpreter, importing this checkout's packages."""
    saved = {k: os.environ.get(k) for k in ("PATH", "PYTHONPATH")}
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    if (PROJECT_ROOT / "meg" / "__init__.py").is_file():
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), saved["PYTHONPATH"]) if p)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_local(params_path: str | Path = "params.yaml", workdir: str | Path = "kfp-local", shards: int = 2,
              data_dir: str | Path = "data", cache_dir: str | Path = "cache", tracking_uri: str | None = None,
              experiment: str = "meg", generator_device: str = "cpu") -> Path:
    """Run the whole pipeline locally; returns the pipeline root holding every step's artifacts."""
    from kfp import local

    from meg import config

    text = Path(params_path).read_text()
    weights = weights_of(text, str(params_path))  # fail here, not in the first step
    workdir = Path(workdir).resolve()
    root = workdir / "pipeline-root"
    root.mkdir(parents=True, exist_ok=True)
    if tracking_uri is None:
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    with _step_environment():
        build(shards, weights=weights)(params=text, data_dir=str(Path(data_dir).resolve()) if data_dir else "",
                      cache_dir=str(Path(cache_dir).resolve()) if cache_dir else "", tracking_uri=tracking_uri,
                      experiment=experiment, generator_device=generator_device)
    return root
