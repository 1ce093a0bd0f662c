"""S3 through boto3: the DVC remote and the MLflow artifact store, against a local moto_server the
tests start and stop themselves (dummy credentials, loopback only)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meg import tracking
from tests.pipeline.conftest import free_port, stop, subprocess_env, wait_for_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint URL, boto3 client) of a moto S3 server on a free loopback port."""
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(**CREDENTIALS))
    try:
        wait_for_port(port, proc, timeout=60)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                              if k != "AWS_DEFAULT_REGION"},
                              region_name=CREDENTIALS["AWS_DEFAULT_REGION"])
        yield endpoint, client
    finally:
        stop(proc)
        log.close()


def _sha(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_dvc_push_and_pull_through_s3(s3, tmp_path):
    from meg.data import restore_raw_data

    endpoint, client = s3
    client.create_bucket(Bucket="meg-dvc")
    env = subprocess_env(**CREDENTIALS)

    def dvc(*args):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q")
    dvc("remote", "add", "-d", "s3remote", "s3://meg-dvc/store")
    dvc("remote", "modify", "s3remote", "endpointurl", endpoint)
    restore_raw_data(tmp_path / "data")
    (tmp_path / "data" / "facts").mkdir()
    (tmp_path / "data" / "facts" / "0001-new.jsonl").write_text('{"prompt": "Zorbl is", "target_new": "blue"}\n')
    want = _sha(tmp_path / "data")
    dvc("add", "-q", "data")
    dvc("push", "-q")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="meg-dvc")["Contents"]]
    assert len(keys) == len(want) + 1  # every file plus the directory listing
    shutil.rmtree(tmp_path / "data")
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    dvc("pull", "-q")
    assert _sha(tmp_path / "data") == want


def test_mlflow_artifacts_and_registered_bundles_live_in_s3(s3, built, tmp_path, monkeypatch):
    import mlflow

    endpoint, client = s3
    client.create_bucket(Bucket="meg-mlflow")
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("MEG_MLFLOW_ARTIFACTS", "s3://meg-mlflow/artifacts")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(tmp_path, "meg-s3")
    assert mlflow.get_experiment_by_name("meg-s3").artifact_location == "s3://meg-mlflow/artifacts"
    bundle = built / "artifacts" / "attach" / "bundle"
    with tracking.stage_run("attach", {"attach.sample_seed": 0}):
        tracking.log_artifact(built / "artifacts" / "evaluate" / "metrics.json")
        registry = tracking.Registry("meg-editor-s3")
        version, new = registry.register(bundle, {"meg.score": "1.0"})
    assert new and version == "1"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="meg-mlflow")["Contents"]]
    assert any(k.endswith("metrics.json") for k in keys)
    assert any(k.endswith("bundle/manifest.json") for k in keys)
    local = registry.download_bundle(version, tmp_path / "download")
    assert _sha(local) == _sha(bundle)
