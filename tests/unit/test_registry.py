"""Registry references: a real local sqlite MLflow store, a registered pyfunc carrying a bundle, an alias.

The pyfunc here answers through ``EditedModel.answer``, as the pipeline's pyfunc model does, so the
test also checks that the registry model, the CLI and the HTTP service give the same answers.
"""

from __future__ import annotations

import json
import os

import mlflow
import pandas as pd
import pytest

from meg import tracking
from meg.bundle import open_model
from meg.editor import EditedModel, _hash_tree
from meg.errors import BundleError
from tests.tiny_bundle import UNRELATED, tiny_bundle, tiny_edits, tiny_loaded


class BundleAnswerer(mlflow.pyfunc.PythonModel):
    """A pyfunc model whose artifact 'bundle' is an edit bundle; predict answers a 'question' column."""

    def load_context(self, context):
        self.model = EditedModel.load(context.artifacts["bundle"], loaded=tiny_loaded())

    def predict(self, context, model_input, params=None):
        return self.model.answer(list(model_input["question"]))["answers"]


class NoBundle(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return []


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    old_env = os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it
    tracking.configure(root)
    assert mlflow.get_experiment_by_name(tracking.EXPERIMENT).artifact_location.startswith(root.as_uri())
    client = mlflow.MlflowClient()
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=BundleAnswerer(),
                                artifacts={"bundle": str(tiny_bundle())}, registered_model_name="meg-editor")
        mlflow.pyfunc.log_model(name="plain", python_model=NoBundle(), registered_model_name="not-an-editor")
    client.set_registered_model_alias("meg-editor", "champion", "1")
    client.set_registered_model_alias("not-an-editor", "champion", "1")
    yield root
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if old_env is not None:
        os.environ["MLFLOW_TRACKING_URI"] = old_env


def questions():
    return [e.prompt for e in tiny_edits()[:4]] + [tiny_edits()[0].paraphrases[0]] + list(UNRELATED[:2])


def test_download_bundle_resolves_an_alias(registry, tmp_path):
    local = tracking.download_bundle("models:/meg-editor@champion", tmp_path / "dl")
    assert (local / "manifest.json").is_file() and local.is_relative_to(tmp_path / "dl")
    assert _hash_tree(local) == _hash_tree(tiny_bundle())  # every file arrives unchanged
    by_version = tracking.download_bundle("models:/meg-editor/1", tmp_path / "v1")
    assert _hash_tree(by_version) == _hash_tree(tiny_bundle())


def test_registry_model_cli_library_and_service_agree(registry, tmp_path):
    from meg.service import BackgroundService, ServiceConfig, model_answerer
    from tests.unit.test_service import call

    qs = questions()
    direct = EditedModel.load(tiny_bundle(), loaded=tiny_loaded()).answer(qs)["answers"]
    via_registry = open_model("models:/meg-editor@champion", loaded=tiny_loaded())
    assert via_registry.answer(qs)["answers"] == direct
    pyfunc = mlflow.pyfunc.load_model("models:/meg-editor@champion")
    assert list(pyfunc.predict(pd.DataFrame({"question": qs}))) == direct
    cfg = ServiceConfig(port=0, max_wait_ms=0)
    answer_rows, info = model_answerer(via_registry, cfg)
    with BackgroundService(answer_rows, cfg, info) as svc:
        status, body, _ = call(svc.url, "/v1/answer", {"questions": qs})
    assert status == 200 and body["answers"] == direct


@pytest.mark.parametrize("ref, needle", [
    ("models:/meg-editor@nobody", "cannot resolve"),
    ("models:/no-such-model@champion", "cannot resolve"),
    ("models:/meg-editor/99", "cannot resolve"),
    ("models:/not-an-editor@champion", "no artifact named 'bundle'"),
])
def test_bad_references_raise_bundle_error(registry, tmp_path, ref, needle):
    with pytest.raises(BundleError, match=needle) as err:
        tracking.download_bundle(ref, tmp_path)
    assert ref in str(err.value)


def test_meg_ask_takes_a_registry_reference(registry, capsys):
    from meg.cli import main

    qs = questions()[:2]
    assert main(["ask", "models:/meg-editor@champion", *qs, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answers"] == EditedModel.load(tiny_bundle()).answer(qs)["answers"]
    assert main(["ask", "models:/meg-editor@nobody", "q"]) == 2
    assert "models:/meg-editor@nobody" in capsys.readouterr().err


def test_a_downloaded_bundle_must_match_the_sha256_its_version_was_registered_with(registry, tmp_path):
    client = mlflow.MlflowClient()
    right = tracking.bundle_sha256(tiny_bundle())
    try:
        client.set_model_version_tag("meg-editor", "1", tracking.SHA_TAG, right)
        local = tracking.download_bundle("models:/meg-editor@champion", tmp_path / "ok")
        assert tracking.bundle_sha256(local) == right
        client.set_model_version_tag("meg-editor", "1", tracking.SHA_TAG, "0" * 64)  # the store's artifact changed
        for ref in ("models:/meg-editor@champion", "models:/meg-editor/1"):
            with pytest.raises(BundleError, match="registered with 0000") as err:
                tracking.download_bundle(ref, tmp_path / "bad")
            assert ref in str(err.value)
        with pytest.raises(BundleError, match="stored artifact changed"):
            tracking.Registry("meg-editor").download_bundle("1", tmp_path / "bad2")
    finally:
        client.delete_model_version_tag("meg-editor", "1", tracking.SHA_TAG)
    with pytest.warns(UserWarning, match="no 'meg.bundle_sha256' tag"):
        tracking.download_bundle("models:/meg-editor/1", tmp_path / "untagged")
