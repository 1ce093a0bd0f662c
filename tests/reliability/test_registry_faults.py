"""Registry faults, against a real MLflow registry in SQLite: two promotions racing, a promotion
failing half-way, and bundles that do not belong to the base model they are loaded on."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from meg import config, lm, tracking
from meg.editor import EditedModel
from meg.errors import BundleError
from meg.stages import promote as promote_stage
from tests.pipeline.conftest import write_params
from tests.pipeline.test_promote import NAME
from tests.reliability.plugin import count
from tests.tiny_bundle import tiny_bundle


@pytest.fixture(scope="module")
def registry_template(tmp_path_factory):
    """A SQLite registry holding two registered versions (Score 60 and 70), neither champion yet.

    The bundles are stand-ins (promotion reads only their sha256 and the evaluation's numbers).
    """
    import mlflow

    from meg.stages.common import write_json

    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as m:
        m.delenv("MLFLOW_TRACKING_URI", raising=False)
        m.delenv("MEG_MLFLOW_ARTIFACTS", raising=False)
        params = config.default_params()
        params["promote"].update(min_score=0.0, min_locality=0.0)
        write_params(root, params)
        tracking.configure(root)
        for score in (60.0, 70.0):
            keep = root / f"cand-{int(score)}"
            (keep / "bundle").mkdir(parents=True)
            write_json(keep / "bundle" / "manifest.json", {"stand-in": score})
            write_json(keep / "evaluate" / "metrics.json", {"meg": {"score": score, "loc_ag": 90.0}})
            write_json(keep / "evaluate" / "report.json", {"eval_key": "same-evaluation"})
            with mlflow.start_run():
                _, new = tracking.Registry(NAME).register(keep / "bundle", {})
            assert new
    return root


@pytest.fixture
def two_candidates(registry_template, tmp_path, monkeypatch):
    """A copy of the template registry: (root, {score: (bundle dir, evaluate dir)})."""
    root = shutil.copytree(registry_template, tmp_path / "ws")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(root)
    return root, {s: (root / f"cand-{int(s)}" / "bundle", root / f"cand-{int(s)}" / "evaluate") for s in (60.0, 70.0)}


def _promote(root: Path, bundle: Path, evaluate: Path, out: Path) -> dict:
    view = config.load_params(root / "params.yaml")
    promote_stage.run(view, root / "prepare", evaluate, bundle, out, tracking.Registry(NAME))
    return promote_stage.read_json(out / "decision.json")


def _holders(root: Path) -> list[str]:
    tracking.configure(root)
    return tracking.Registry(NAME).holders("champion")


@pytest.mark.fault("concurrent promotion",
                   "two promotions racing: both read 'no champion', the worse one moves the alias last",
                   "promotions are serialised (lock beside the SQLite store): exactly one champion, the better one")
def test_racing_promotions_end_with_one_consistent_champion(two_candidates, monkeypatch):
    root, cands = two_candidates
    barrier = threading.Barrier(2)
    better_set = threading.Event()
    real_champion, real_set_alias = tracking.Registry.champion, tracking.Registry.set_alias

    def champion(self, alias):
        found = real_champion(self, alias)
        try:  # hold here until the other promotion has read the champion too (if it can)
            barrier.wait(timeout=3)
        except threading.BrokenBarrierError:
            pass
        return found

    def set_alias(self, alias, version):
        if self.client.get_model_version(NAME, version).tags.get("meg.score") == "60.0000":
            better_set.wait(timeout=3)  # the worse candidate moves the alias last
        real_set_alias(self, alias, version)
        if self.client.get_model_version(NAME, version).tags.get("meg.score") == "70.0000":
            better_set.set()

    monkeypatch.setattr(tracking.Registry, "champion", champion)
    monkeypatch.setattr(tracking.Registry, "set_alias", set_alias)
    decisions, errors = {}, []

    def go(score):
        try:
            decisions[score] = _promote(root, *cands[score], root / f"promote-{int(score)}")
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(s,)) for s in cands]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    count(2)
    reg = tracking.Registry(NAME)
    better = decisions[70.0]["candidate_version"]
    assert _holders(root) == [better]
    assert reg.client.get_model_version(NAME, better).tags["meg.decision"] == "promoted"
    promoted = [d for d in decisions.values() if d["promoted"]]
    # every promotion saw the champion it replaced: the chain of champions has no gap
    if len(promoted) == 2:
        first, second = sorted(promoted, key=lambda d: d["champion_version"] is not None)
        assert first["champion_version"] is None and second["champion_version"] == first["candidate_version"]


@pytest.mark.fault("concurrent promotion",
                   "two promotion processes at once on one SQLite store, each pausing after reading the champion",
                   "serialised by the file lock: exactly one champion, the better one, whoever starts first")
def test_racing_promotion_processes_end_with_the_better_champion(two_candidates):
    import subprocess
    import sys

    from tests.pipeline.conftest import subprocess_env

    root, cands = two_candidates
    procs = [subprocess.Popen([sys.executable, "-m", "tests.reliability._worker", "promote", str(root),
                               str(root / f"promote-{int(score)}"), "--cand", str(cands[score][0].parent),
                               "--delay", str(delay)],
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for score, delay in ((60.0, 3.0), (70.0, 1.0))]  # unlocked, the worse one would move the alias last
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    count(2)
    decisions = {s: promote_stage.read_json(root / f"promote-{int(s)}" / "decision.json") for s in cands}
    better = decisions[70.0]["candidate_version"]
    assert _holders(root) == [better]
    assert tracking.Registry(NAME).client.get_model_version(NAME, better).tags["meg.decision"] == "promoted"


@pytest.mark.fault("failing registry", "setting the alias raises (registry down half-way through a promotion)",
                   "the previous champion stays; rerunning the promotion completes it")
def test_a_promotion_failing_when_moving_the_alias_keeps_the_champion(two_candidates, monkeypatch):
    root, cands = two_candidates
    first = _promote(root, *cands[60.0], root / "p1")
    assert first["promoted"] and _holders(root) == [first["candidate_version"]]

    def down(self, alias, version):
        raise ConnectionError("registry unreachable")

    with monkeypatch.context() as m:
        m.setattr(tracking.Registry, "set_alias", down)
        with pytest.raises(ConnectionError):
            _promote(root, *cands[70.0], root / "p2")
    assert _holders(root) == [first["candidate_version"]]
    assert not (root / "p2" / "decision.json").exists()
    again = _promote(root, *cands[70.0], root / "p2")
    assert again["promoted"] and _holders(root) == [again["candidate_version"]]


@pytest.mark.fault("failing registry", "tagging the decision raises after the alias moved",
                   "one champion (the new one); rerunning records the decision")
def test_a_promotion_failing_after_the_alias_moved_is_completed_by_a_rerun(two_candidates, monkeypatch):
    root, cands = two_candidates
    real = tracking.Registry.set_tags

    def flaky(self, version, tags):
        if "meg.decision" in tags:
            raise ConnectionError("registry unreachable")
        real(self, version, tags)

    with monkeypatch.context() as m:
        m.setattr(tracking.Registry, "set_tags", flaky)
        with pytest.raises(ConnectionError):
            _promote(root, *cands[70.0], root / "p")
    (holder,) = _holders(root)
    again = _promote(root, *cands[70.0], root / "p")
    assert again["promoted"] and again["candidate_version"] == holder and "already the champion" in again["reasons"][0]
    tags = tracking.Registry(NAME).client.get_model_version(NAME, holder).tags
    assert tags["meg.decision"] == "promoted"


# ---------------------------------------------------------------- bundles on the wrong base model

@pytest.fixture(scope="module")
def other_llama(tokenizer):
    """The same architecture as the pipeline's tiny base model, other random weights: another hash."""
    return lm.tiny_model("llama", tokenizer, seed=1)


@pytest.mark.fault("wrong base model", "a bundle opened on a base model of the same architecture, other weights",
                   "refused with BundleError naming both hashes")
def test_bundle_on_another_base_model_is_refused(other_llama):
    bundle = tiny_bundle()
    with pytest.raises(BundleError, match="built for base model .* with hash .* but the loaded model has hash"):
        EditedModel.load(bundle, loaded=other_llama)


@pytest.mark.fault("wrong base model", "the champion downloaded from the registry, opened on another base model",
                   "refused with BundleError")
def test_registered_bundle_on_another_base_model_is_refused(tmp_path, monkeypatch, other_llama):
    import mlflow

    from meg.bundle import open_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(tmp_path)
    with mlflow.start_run():
        version, _ = tracking.Registry(NAME).register(tiny_bundle(), {})
    tracking.Registry(NAME).set_alias("champion", version)
    with pytest.raises(BundleError, match="hash"):
        open_model(f"models:/{NAME}@champion", loaded=other_llama)


@pytest.mark.fault("corrupted checkpoint", "a bundle with one file truncated, or its manifest missing",
                   "refused with BundleError (sha256 of every file in the manifest)")
@pytest.mark.parametrize("damage", ["truncated file", "no manifest"])
def test_damaged_bundle_is_refused(tmp_path, damage):
    bundle = shutil.copytree(tiny_bundle(), tmp_path / "bundle")
    if damage == "no manifest":
        (bundle / "manifest.json").unlink()
    else:
        target = bundle / "weights.safetensors"
        target.write_bytes(target.read_bytes()[:-7])
    with pytest.raises(BundleError):
        EditedModel.load(bundle)
