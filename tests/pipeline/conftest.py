"""Fixtures of the pipeline tests: a tiny random base model saved as a local model directory, small
settings that run every stage in seconds, and a workspace holding the raw facts and params.yaml."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer random Llama with the SmolLM2 tokenizer, as a Hugging Face directory (loads via meg.lm)."""
    from meg import lm

    out = tmp_path_factory.mktemp("tiny-llama")
    loaded = lm.tiny_model("llama", tokenizer)
    loaded.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def small_params(model_dir: Path, n_edits: int = 8) -> dict:
    """Every section at the library defaults, shrunk so that each stage takes seconds."""
    from meg import config

    p = config.default_params()
    p["base"]["model"] = str(model_dir)
    p["prepare"].update(n_edits=n_edits, label_batch_size=16, rewordings="frames")
    p["fit"].update(layer=2, optimizer="adam", lr=0.3, max_steps=15, n_variants=0, suffix="", chunk_size=8,
                    stop="success", n_prefixes=0, chat_contexts=1)
    p["encoder"].update(n_pseudo=64, trainable="none")
    p["router"].update(n_pseudo=32)
    p["generator"].update(width=32, depth=1, heads=2, mlp_ratio=1.0, max_steps=12, warmup_steps=2, batch_size=64,
                          eval_every=6, eval_size=16, eval_steps=2, sample_steps=3, checkpoint_every=6,
                          variants=False, warm_max_steps=6,
                          weights="generator")  # the stages are tested with the diffusion generator; lookup has its own test
    p["evaluate"].update(methods=["none"], batch_size=16)
    p["promote"].update(min_score=0.0, min_locality=0.0)
    return p


@pytest.fixture
def params(tiny_model_dir) -> dict:
    return small_params(tiny_model_dir)


def write_params(root: Path, params: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def workspace(tmp_path, params) -> Path:
    """A directory with data/ (the packaged raw facts) and params.yaml."""
    from meg.data import restore_raw_data

    restore_raw_data(tmp_path / "data")
    write_params(tmp_path, params)
    return tmp_path


@pytest.fixture(scope="session")
def built(tmp_path_factory, tiny_model_dir) -> Path:
    """A workspace where prepare .. evaluate ran once (tracking off); copy it before changing it."""
    from meg import runner
    from meg.data import restore_raw_data

    root = tmp_path_factory.mktemp("built")
    restore_raw_data(root / "data")
    write_params(root, small_params(tiny_model_dir))
    saved = os.environ.get("MEG_TRACKING")
    os.environ["MEG_TRACKING"] = "off"
    try:
        for stage in ("prepare", "fit", "encoder", "router", "generator", "attach", "evaluate"):
            runner.run_stage(stage, root / "params.yaml", root, progress=False)
    finally:
        if saved is None:
            os.environ.pop("MEG_TRACKING")
        else:
            os.environ["MEG_TRACKING"] = saved
    return root


def copy_workspace(src: Path, dst: Path, monkeypatch) -> Path:
    """A copy of a built workspace with its own (empty) MLflow store and tracking on."""
    from meg import tracking

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MEG_TRACKING", "on")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def subprocess_env(**extra: str) -> dict:
    """The environment of a child process that must import this checkout's meg (not another install)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env
