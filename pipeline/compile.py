"""Compile the pipeline into a Kubeflow pipeline spec (YAML) with the kfp compiler."""

from __future__ import annotations

from pathlib import Path

from pipeline.dag import build


def compile_pipeline(out: str | Path = "meg-pipeline.yaml", shards: int = 4, weights: str = "lookup") -> Path:
    """Compile for the ``generator.weights`` setting ``weights`` (``weights_of`` reads it from params)."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.yaml")
    compiler.Compiler().compile(build(shards, weights=weights), package_path=str(tmp))
    tmp.replace(out)
    return out


def weights_of(params_text: str, where: str = "params") -> str:
    """The ``generator.weights`` setting of params.yaml's text (validated)."""
    from meg import config

    return config.parse_params(params_text, where)["generator"]["weights"]
