"""Interruptions: a process SIGKILLed while fitting or training the generator resumes from its store
or checkpoint and ends exactly where an uninterrupted run ends; a damaged store part or checkpoint
is detected by its sha256 and fitted again or refused, never used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meg import fit
from meg.errors import BundleError
from meg.generator import WeightGenerator
from tests.pipeline.conftest import subprocess_env
from tests.reliability import _worker
from tests.reliability.plugin import count


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one thread is faster on a busy machine, as in the worker processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(job: str, work: Path, out: Path, hang_at: int | None = None) -> subprocess.CompletedProcess | None:
    """Run the worker to the end, or (``hang_at``) until it hangs at the chosen point, then SIGKILL it."""
    cmd = [sys.executable, "-m", "tests.reliability._worker", job, str(work), str(out)]
    if hang_at is None:
        done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done
    proc = subprocess.Popen(cmd + ["--hang-at", str(hang_at)], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("HANG"), (line, proc.stderr.read()[-2000:] if proc.poll() is not None else "")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert not out.exists()
    return None


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs of both jobs (fresh work directories), in this process, one thread like the worker."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("reference")
    for job, run in (("fit", _worker.fit_job), ("generator", _worker.generator_job)):
        save_file({k: v.contiguous() for k, v in run(str(root / f"{job}-work"), None).items()},
                  str(root / f"{job}.safetensors"))
    return root


def _resume(job: str, work: Path, out: Path) -> None:
    """The rerun after a kill, in this process (the kill itself happened in a child process)."""
    from safetensors.torch import save_file

    tensors = (_worker.fit_job if job == "fit" else _worker.generator_job)(str(work), None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))


# ---------------------------------------------------------------- SIGKILL and resume

@pytest.mark.fault("interruption", "SIGKILL while fitting per-edit neurons (during chunk 2 of 3; during chunk 3)",
                   "rerun reuses the stored chunks; weights, success, steps, loss equal an uninterrupted run "
                   "bit for bit")
@pytest.mark.parametrize("hang_at", [2, 3])
def test_sigkill_during_fitting_resumes_to_the_same_result(reference, tmp_path, hang_at):
    work = tmp_path / "work"
    _run("fit", work, tmp_path / "killed.safetensors", hang_at=hang_at)
    stored = list(work.rglob("part-*.json"))
    assert len(stored) == hang_at - 1  # the chunks finished before the kill, nothing of the one killed
    _resume("fit", work, tmp_path / "resumed.safetensors")
    _assert_same(reference / "fit.safetensors", tmp_path / "resumed.safetensors")
    assert len(list(work.rglob("part-*.json"))) == _worker.N_EDITS // _worker.CHUNK
    assert not list(work.rglob("*.tmp"))


@pytest.mark.fault("interruption", "SIGKILL while training the generator (between checkpoints; just before one)",
                   "resumes from the last checkpoint; EMA weights, samples and error history equal an "
                   "uninterrupted run")
@pytest.mark.parametrize("hang_at", [15, 20])
def test_sigkill_during_generator_training_resumes_to_the_same_result(reference, tmp_path, hang_at):
    work = tmp_path / "ckpt"
    _run("generator", work, tmp_path / "killed.safetensors", hang_at=hang_at)
    assert json.loads((work / "latest.json").read_text())["step"] == 10  # the step-20 checkpoint was never written
    _resume("generator", work, tmp_path / "resumed.safetensors")
    _assert_same(reference / "generator.safetensors", tmp_path / "resumed.safetensors")


# ---------------------------------------------------------------- damaged store parts (fitting)

def _fit(work: Path):
    from tests.conftest import make_edit
    from tests.unit.test_fit import EDITS

    loaded = _worker._tiny_llama()
    edits = [make_edit(i, p, t) for i, (p, t) in enumerate(EDITS[: _worker.N_EDITS])]
    cfg = fit.FitConfig(layer=2, optimizer="adam", lr=0.3, max_steps=40, chunk_size=_worker.CHUNK, suffix="")
    return fit.fit_edits(loaded, edits, cfg, store_dir=work, progress=False)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data: the file still parses
    path.write_bytes(bytes(data))


def _garble_index(path: Path) -> None:
    path.with_suffix(".json").write_text('{"keys": [')


DAMAGE = {"truncated part": _truncate, "one flipped bit in the tensor data": _flip_last_byte,
          "garbled part index": _garble_index}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    work = tmp_path_factory.mktemp("fitted")
    return work, _fit(work)


@pytest.mark.fault("corrupted checkpoint", "fitting store: truncated part, flipped bit in a part, garbled index",
                   "detected (sha256 / parse), warned, those edits fitted again: same result")
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_store_part_is_fitted_again(fitted, tmp_path, damage):
    import shutil

    src, first = fitted
    work = tmp_path / "store"
    shutil.copytree(src, work)
    part = sorted(work.rglob("part-*.safetensors"))[0]
    DAMAGE[damage](part)
    with pytest.warns(UserWarning, match="damaged fitted weights"):
        again = _fit(work)
    for name in ("weights", "success", "steps", "loss"):
        assert torch.equal(getattr(again, name), getattr(first, name)), name
    assert fit.WeightStore(part.parent).load().keys() == fit.WeightStore(next(src.iterdir())).load().keys()


@pytest.mark.fault("interruption", "leftover temporary files of a killed write (fitting store)",
                   "ignored; the store reads as before")
def test_leftover_tmp_files_are_ignored(fitted, tmp_path):
    import shutil

    src, first = fitted
    work = tmp_path / "store"
    shutil.copytree(src, work)
    part = sorted(work.rglob("part-*.safetensors"))[0]
    part.with_suffix(".tmp").write_bytes(part.read_bytes()[:100])
    part.with_suffix(".json.tmp").write_text('{"ke')
    again = _fit(work)
    assert torch.equal(again.weights, first.weights)


# ---------------------------------------------------------------- damaged checkpoints (generator)

def _train(work: Path, max_steps: int = _worker.GEN_STEPS) -> WeightGenerator:
    # the stopped run below is a shorter max_steps: with a constant rate its continuation is exactly the
    # uninterrupted run (under cosine it would be a warm restart); the SIGKILL tests cover the default
    gen = WeightGenerator(_worker.generator_config(max_steps=max_steps, lr_schedule="constant"))
    gen.fit(*_worker.generator_pairs(), ckpt_dir=work, progress=False)
    return gen


@pytest.fixture(scope="module")
def generator_runs(tmp_path_factory):
    """A full run, and a work directory stopped at step 20 (checkpoint written there)."""
    full = _train(tmp_path_factory.mktemp("gen-full"))
    half = tmp_path_factory.mktemp("gen-half")
    _train(half, max_steps=20)
    return full, half


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.fault("corrupted checkpoint",
                   "generator checkpoint: truncated, one flipped bit, garbled pointer, pointer to a missing file",
                   "refused with BundleError naming the file (never loaded)")
@pytest.mark.parametrize("damage", ["truncated", "flipped bit", "garbled pointer", "missing file"])
def test_damaged_generator_checkpoint_is_refused(generator_runs, tmp_path, damage):
    work = _copy(generator_runs[1], tmp_path / "ckpt")
    (ckpt,) = work.glob("step-*.safetensors")
    if damage == "truncated":
        _truncate(ckpt)
    elif damage == "flipped bit":
        _flip_last_byte(ckpt)
    elif damage == "garbled pointer":
        (work / "latest.json").write_text('{"file": "step-')
    else:
        ckpt.unlink()
    with pytest.raises(BundleError) as info:
        _train(work)
    assert str(work) in str(info.value)


@pytest.mark.fault("interruption", "a killed checkpoint write: partial step-*.safetensors.tmp and latest.json.tmp",
                   "ignored; training resumes from the last complete checkpoint to the uninterrupted result")
def test_partial_checkpoint_write_is_ignored(generator_runs, tmp_path):
    full, half = generator_runs
    work = _copy(half, tmp_path / "ckpt")
    (ckpt,) = work.glob("step-*.safetensors")
    (work / "step-0000030.safetensors.tmp").write_bytes(ckpt.read_bytes()[:500])
    (work / "latest.json.tmp").write_text('{"file": "step-0000030.saf')
    resumed = _train(work)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- writes are atomic

@pytest.mark.fault("interruption", "every file of the fitting store and the generator checkpoints",
                   "written under a temporary name and moved into place with os.replace")
def test_checkpoint_files_are_written_atomically(tmp_path, monkeypatch):
    replaced: list[str] = []
    real = os.replace

    def spy(src, dst, *a, **kw):
        replaced.append(Path(dst).name)
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", spy)
    _fit(tmp_path / "fit")
    _train(tmp_path / "gen", max_steps=10)
    final = [p for p in (tmp_path / "fit").rglob("*") if p.is_file()] + list((tmp_path / "gen").iterdir())
    count(len(final))
    assert final and all(p.name in replaced for p in final), [p.name for p in final if p.name not in replaced]


# ---------------------------------------------------------------- the fit stage's output

@pytest.mark.fault("interruption", "fit stage killed between writing weights.safetensors and fit.json "
                   "(new weights beside the old index); weights truncated",
                   "refused with BundleError naming the file (sha256 recorded in fit.json)")
@pytest.mark.parametrize("damage", ["new weights, old fit.json", "truncated weights"])
def test_fit_stage_output_mismatch_is_refused(tmp_path, damage):
    from safetensors.torch import save_file

    from meg.stages import fit as fit_stage

    out = tmp_path / "fit"
    fit_stage._write(out, ["a", "b"], ["k1", "k2"], 2, {"w": torch.ones(2, 5)}, {}, {})
    meta, tensors = fit_stage.read(out)  # reads back what was written
    assert torch.equal(tensors["w"], torch.ones(2, 5)) and meta["keys"] == ["k1", "k2"]
    weights = out / "weights.safetensors"
    if damage == "truncated weights":
        _truncate(weights)
    else:  # the next run replaced the weights, and was killed before it replaced fit.json
        save_file({"w": torch.zeros(3, 5)}, str(weights))
    with pytest.raises(BundleError, match="weights.safetensors"):
        fit_stage.read(out)
