"""Compile the pipeline into a Kubeflow pipeline spec (YAML) with the kfp compiler."""

from __future__ import annotations

from pathlib import Path

from pipeline.dag import build


def compile_pipeline(out: str | Path = "meg-pipeline.yaml", shards: int = 4) -> Path:
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.yaml")
    compiler.Compiler().compile(build(shards), package_path=str(tmp))
    tmp.replace(out)
    return out
