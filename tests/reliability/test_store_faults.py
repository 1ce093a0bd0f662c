"""S3 faults, against a real moto_server that the tests start, kill and start again: the DVC remote
down before or during `dvc push`, and the MLflow artifact store down while a bundle is uploaded for
registration, for good or for a moment.

Where a fault must land in the middle of an upload, the clients reach the server through a loopback
relay (``Relay``) that forwards every byte until a chosen number of bytes from the clients has
passed, then kills the server (or only drops the connections) and refuses connections like a stopped
server. moto keeps its buckets in memory: a restarted server is empty, so the tests create the
bucket again, as an operator would after restoring a store.

botocore retries each request by itself (legacy mode, 5 attempts, up to about 15 s of backoff
against a dead endpoint; ``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``). The tests set
``AWS_MAX_ATTEMPTS=1`` so that a failing request fails at once and what they observe is meg's retry
of a whole upload (``MEG_STORE_RETRIES``, ``MEG_STORE_BACKOFF``, see ``meg.tracking``), at small
values.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from meg import tracking
from meg.errors import StoreError
from tests.reliability.plugin import count
from tests.pipeline.conftest import free_port, subprocess_env, wait_for_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
FAST = {"AWS_MAX_ATTEMPTS": "1", "DVC_NO_ANALYTICS": "1"}  # one attempt per request: failures show at once
NAME = "meg-editor"
BUCKET = "meg-mlflow"
ARTIFACTS = f"s3://{BUCKET}/artifacts"


class Moto:
    """A moto S3 server on a fixed loopback port, to kill and start again on the same port (it keeps
    its buckets in memory: a restarted server is empty)."""

    def __init__(self, log_dir: Path):
        self.port, self.log_dir, self.starts = free_port(), log_dir, 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> Moto:
        self.starts += 1
        with open(self.log_dir / f"moto-{self.starts}.log", "w") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(**CREDENTIALS))
        wait_for_port(self.port, self.proc, timeout=120)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}", region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


class Relay:
    """A loopback TCP relay in front of the S3 server, so that a fault lands at a chosen point.

    It forwards both ways until ``cut_after(n)`` bytes from the clients have passed; then it runs
    ``then`` (e.g. kills the server), drops every connection and stops listening, so that its
    endpoint refuses connections like a stopped server, until ``restore()``.
    """

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self.tripped = threading.Event()
        self._lock = threading.Lock()
        self._budget: int | None = None
        self._then: Callable[[], None] | None = None
        self._socks: list[socket.socket] = []
        self._listen()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_after(self, n_bytes: int, then: Callable[[], None] | None = None) -> None:
        with self._lock:
            self._budget, self._then = n_bytes, then
            if n_bytes <= 0:
                self._trip()

    def restore(self) -> None:
        with self._lock:
            self._budget, self._then, self._socks = None, None, []
            self.tripped.clear()
            self._listen()

    def close(self) -> None:
        with self._lock:
            self._then = None
            self._trip()

    def _listen(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _trip(self) -> None:  # under self._lock
        if self.tripped.is_set():
            return
        self.tripped.set()
        if self._then is not None:
            self._then()
        for s in [self._server, *self._socks]:
            _shut(s)

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
                upstream.settimeout(None)
            except OSError:
                _shut(client)
                continue
            with self._lock:
                if self.tripped.is_set():
                    _shut(client)
                    _shut(upstream)
                    continue
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data or self.tripped.is_set():
                    break
                if not from_client:
                    dst.sendall(data)
                    continue
                with self._lock:
                    if self.tripped.is_set():
                        break
                    trip = False
                    if self._budget is not None:
                        data, trip = data[:self._budget], len(data) >= self._budget
                        self._budget -= len(data)
                    dst.sendall(data)
                    if trip:
                        self._trip()
                        break
        except OSError:
            pass
        finally:
            _shut(src)
            _shut(dst)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def _sha(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _random_files(root: Path, n: int, size: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"part-{i}.bin").write_bytes(os.urandom(size))
    return root


@pytest.fixture
def moto(tmp_path):
    server = Moto(tmp_path).start()
    yield server
    server.kill()


@pytest.fixture
def relay(moto):
    r = Relay(moto.port)
    yield r
    r.close()


# ---------------------------------------------------------------------------------- dvc push


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                          env=subprocess_env(**CREDENTIALS, **FAST), timeout=600)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.fault("S3 outage",
                   "the DVC remote's S3 server stopped before `dvc push`, or killed half-way through it",
                   "dvc exits non-zero naming the endpoint; the DVC cache and the workspace unchanged; after a "
                   "restart (empty: bucket made again) a rerun pushes everything and `dvc pull` in a clean "
                   "checkout gives identical files. meg never runs `dvc push` itself (`meg facts add` prints "
                   "the command), so nothing wraps or retries it")
@pytest.mark.parametrize("when", ["before", "during"])
def test_dvc_push_with_the_remote_down(moto, relay, tmp_path, when):
    ws = tmp_path / "ws"
    ws.mkdir()
    _ok(_dvc(ws, "init", "--no-scm", "-q"))
    _ok(_dvc(ws, "remote", "add", "-d", "store", "s3://meg-dvc/store"))
    _ok(_dvc(ws, "remote", "modify", "store", "endpointurl", relay.endpoint))
    moto.client().create_bucket(Bucket="meg-dvc")
    data = _random_files(ws / "data", 6, 192 * 1024)
    _ok(_dvc(ws, "add", "-q", "data"))
    cache, files = _sha(ws / ".dvc" / "cache"), _sha(data)

    relay.cut_after(0 if when == "before" else 3 * 192 * 1024, then=moto.kill)
    failed = _dvc(ws, "push")
    assert relay.tripped.is_set()
    assert failed.returncode != 0
    said = failed.stdout + failed.stderr
    assert f'Could not connect to the endpoint URL: "http://127.0.0.1:{relay.port}/meg-dvc/store/' in said
    if when == "during":
        assert "failed to push data to the cloud" in said
    assert _sha(ws / ".dvc" / "cache") == cache and _sha(data) == files

    moto.start()
    moto.client().create_bucket(Bucket="meg-dvc")
    relay.restore()
    _ok(_dvc(ws, "push"))
    assert len(moto.keys("meg-dvc")) == len(files) + 1  # every file and the directory listing

    clean = tmp_path / "clean"  # what a clone holds: the DVC config and data.dvc, no cache
    (clean / ".dvc").mkdir(parents=True)
    shutil.copy(ws / ".dvc" / "config", clean / ".dvc" / "config")
    shutil.copy(ws / "data.dvc", clean / "data.dvc")
    _ok(_dvc(clean, "pull", "-q"))
    assert _sha(clean / "data") == files


# ---------------------------------------------------------------------------------- MLflow artifacts


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory) -> Path:
    """A SQLite tracking store whose experiment keeps its artifacts in S3 (copied by each test)."""
    root = tmp_path_factory.mktemp("mlflow-s3")
    with pytest.MonkeyPatch.context() as m:
        m.delenv("MLFLOW_TRACKING_URI", raising=False)
        m.setenv("MEG_MLFLOW_ARTIFACTS", ARTIFACTS)
        tracking.configure(root)
    return root / "mlflow.db"


@pytest.fixture
def store(mlflow_template, moto, relay, tmp_path, monkeypatch) -> Path:
    """A tracking store of its own, its artifacts in the moto bucket reached through the relay."""
    import mlflow

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    for k, v in {**CREDENTIALS, **FAST, "MLFLOW_S3_ENDPOINT_URL": relay.endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.RETRIES_ENV, "2")
    monkeypatch.setenv(tracking.BACKOFF_ENV, "0.05")
    tracking.configure(tmp_path)
    moto.client().create_bucket(Bucket=BUCKET)
    yield tmp_path
    while mlflow.active_run() is not None:
        mlflow.end_run("FAILED")


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A stand-in bundle: a manifest and eight 128 KiB files (registration reads only the manifest's sha256)."""
    root = _random_files(tmp_path / "bundle", 8, 128 * 1024)
    (root / "manifest.json").write_text('{"stand-in": "%s"}' % os.urandom(8).hex())
    return root


HALF_BUNDLE = 4 * 128 * 1024


def _versions() -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient().search_model_versions(f"name = '{NAME}'")


def _logged(bundle: Path) -> dict[str, str]:
    """{model id: status} of the models logged for this bundle."""
    import mlflow

    found = mlflow.search_logged_models(filter_string=f"tags.`meg.bundle_sha256` = '{tracking.bundle_sha256(bundle)}'",
                                        output_format="list")
    return {m.model_id: m.status.value for m in found}


def _register(bundle: Path) -> tuple[str, bool]:
    import mlflow

    with mlflow.start_run(run_name="promote"):
        return tracking.Registry(NAME).register(bundle, {"meg.score": "1.0"})


def _check_complete(version: str, bundle: Path, dst: Path) -> str:
    """The registered version's logged model holds every file: its id (the download equals the bundle)."""
    from mlflow.tracking import MlflowClient

    source = MlflowClient().get_model_version(NAME, version).source
    model_id = source.removeprefix("models:/")
    assert tracking.missing_files(model_id, bundle) == []
    assert _sha(tracking.Registry(NAME).download_bundle(version, dst)) == _sha(bundle)
    return model_id


@pytest.mark.fault("S3 outage", "the artifact store's S3 server killed half-way through uploading a bundle for "
                                "registration, and not back",
                   "StoreError naming the artifact store and endpoint after the configured attempts (one logged "
                   "model per attempt, each marked FAILED); no version of meg-editor registered")
def test_store_killed_during_registration_fails_clearly_and_registers_nothing(store, moto, relay, bundle,
                                                                               monkeypatch):
    monkeypatch.setenv(tracking.RETRIES_ENV, "3")
    relay.cut_after(HALF_BUNDLE, then=moto.kill)
    t0 = time.time()
    with pytest.raises(StoreError) as failed:
        _register(bundle)
    message = str(failed.value)
    assert relay.tripped.is_set()
    assert message.startswith(f"artifact store {ARTIFACTS} (endpoint {relay.endpoint}): uploading the edit bundle")
    assert "failed after 3 attempts" in message and "Traceback" not in message
    assert sorted(_logged(bundle).values()) == ["FAILED"] * 3
    assert _versions() == []
    assert time.time() - t0 < 60  # bounded: 3 attempts, 0.05 + 0.1 s of backoff


@pytest.mark.fault("S3 outage", "the connection to S3 cut half-way through uploading a bundle: the server keeps "
                                "the half upload, whose logged model a later registration finds by its sha256",
                   "StoreError, nothing registered; once S3 is back the registration uploads the bundle again "
                   "(the half upload is FAILED, never registered) and the version downloads whole")
def test_a_half_upload_left_in_the_store_is_never_registered(store, moto, relay, bundle, monkeypatch, tmp_path):
    monkeypatch.setenv(tracking.RETRIES_ENV, "1")
    relay.cut_after(HALF_BUNDLE)
    with pytest.raises(StoreError, match="uploading the edit bundle"):
        _register(bundle)
    (half,) = _logged(bundle)
    held = [k for k in moto.keys(BUCKET) if half in k and "/artifacts/bundle/" in k]
    assert 0 < len(held) < len(list(bundle.iterdir()))  # the store holds part of the bundle
    assert _versions() == []

    relay.restore()
    version, new = _register(bundle)
    assert new and [str(v.version) for v in _versions()] == [version]
    assert _check_complete(version, bundle, tmp_path / "download") != half
    assert _logged(bundle)[half] == "FAILED"


@pytest.mark.fault("S3 outage", "the S3 server restarted empty after attach logged the bundle model (READY) and "
                                "before promote registers it",
                   "the missing files are seen before registering: the bundle is uploaded again and the version "
                   "downloads whole")
def test_a_logged_model_whose_files_the_store_lost_is_uploaded_again(store, moto, bundle, tmp_path):
    import mlflow

    with mlflow.start_run(run_name="attach"):
        first = tracking.log_bundle_model(bundle).removeprefix("models:/")
    assert tracking.missing_files(first, bundle) == []
    moto.kill()
    moto.start()
    moto.client().create_bucket(Bucket=BUCKET)
    assert tracking.missing_files(first, bundle) != []
    version, new = _register(bundle)
    assert new and _check_complete(version, bundle, tmp_path / "download") != first


@pytest.mark.fault("S3 outage", "the artifact store's S3 server killed half-way through uploading a bundle for "
                                "registration, back (empty, bucket made again) within the retry window",
                   "the upload is retried with exponential backoff and succeeds; one version, whose download "
                   "equals the bundle")
def test_a_brief_outage_during_upload_is_ridden_out(store, moto, relay, bundle, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(tracking.RETRIES_ENV, "8")
    monkeypatch.setenv(tracking.BACKOFF_ENV, "0.25")  # waits 0.25, 0.5, 1, ... 16 s: about 32 s in all
    errors: list[BaseException] = []

    def bring_back():
        try:
            assert relay.tripped.wait(timeout=300)
            time.sleep(0.5)
            moto.start()
            moto.client().create_bucket(Bucket=BUCKET)
            relay.restore()
        except BaseException as e:  # reported below
            errors.append(e)

    relay.cut_after(HALF_BUNDLE, then=moto.kill)
    helper = threading.Thread(target=bring_back)
    helper.start()
    try:
        version, new = _register(bundle)
    finally:
        helper.join(timeout=300)
    assert not errors, errors
    assert moto.starts == 2 and new
    assert "attempt 1 of 8 failed" in capsys.readouterr().err
    statuses = _logged(bundle)
    assert "FAILED" in statuses.values()
    assert statuses[_check_complete(version, bundle, tmp_path / "download")] == "READY"
    assert [str(v.version) for v in _versions()] == [version]


@pytest.mark.fault("S3 outage", "the artifact store's bucket does not exist (a failure that retrying cannot mend)",
                   "StoreError at the first attempt naming the store and NoSuchBucket; no version registered")
def test_a_missing_bucket_is_not_retried(store, moto, bundle):
    moto.client().delete_bucket(Bucket=BUCKET)
    with pytest.raises(StoreError, match=f"artifact store {ARTIFACTS} .*uploading the edit bundle .* failed: "
                                         f".*NoSuchBucket") as failed:
        _register(bundle)
    assert "attempts" not in str(failed.value)
    assert list(_logged(bundle).values()) == ["FAILED"]
    assert _versions() == []


@pytest.mark.fault("S3 outage", "the artifact store's S3 server stopped while a stage logs its reports",
                   "StoreError naming the store and the file after the configured attempts")
def test_stage_reports_with_the_store_down(store, moto, relay, tmp_path):
    import mlflow

    report = tmp_path / "report.json"
    report.write_text("{}")
    relay.cut_after(0, then=moto.kill)
    with mlflow.start_run(run_name="evaluate"):
        with pytest.raises(StoreError, match=f"artifact store {ARTIFACTS} .*uploading {report} failed after 2 "
                                             f"attempts: EndpointConnectionError"):
            tracking.log_artifact(report, "evaluate")


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def _raised_from(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception:
            raise outer  # noqa: B904  (chained implicitly, as boto3 does)
    except Exception as e:
        return e


@pytest.mark.fault("S3 outage", "each kind of S3 failure: unreachable, connection dropped, read timeout, 500, "
                                "503 SlowDown (also inside S3UploadFailedError), throttled; no bucket, access "
                                "denied, no credentials; an error that is not the store's",
                   "the first kinds retried up to MEG_STORE_RETRIES attempts, the others StoreError at the first; "
                   "an error that is not the store's passes through unchanged")
def test_which_store_failures_are_retried():
    from boto3.exceptions import S3UploadFailedError
    from botocore import exceptions as boto

    url = "http://127.0.0.1:9"
    transient = [boto.EndpointConnectionError(endpoint_url=url), boto.ConnectionClosedError(endpoint_url=url),
                 boto.ReadTimeoutError(endpoint_url=url), _client_error("InternalError", 500),
                 _client_error("SlowDown", 503), _client_error("Throttling", 400),
                 _raised_from(S3UploadFailedError("Failed to upload"), _client_error("SlowDown", 503))]
    permanent = [_client_error("NoSuchBucket", 404), _client_error("AccessDenied", 403), boto.NoCredentialsError(),
                 _raised_from(S3UploadFailedError("Failed to upload"), _client_error("NoSuchBucket", 404))]
    for error, attempts in [(e, 3) for e in transient] + [(e, 1) for e in permanent]:
        calls = []

        def fail():
            calls.append(1)
            raise error

        with pytest.raises(StoreError, match=f"uploading x failed.*{type(error).__name__}") as failed:
            tracking.with_retries("uploading x", fail, retries=3, backoff=0.0)
        assert len(calls) == attempts, error
        assert failed.value.__cause__ is error
        count()
    calls = []

    def bug():
        calls.append(1)
        raise ValueError("not the store")

    with pytest.raises(ValueError, match="not the store"):
        tracking.with_retries("uploading x", bug, retries=3, backoff=0.0)
    assert len(calls) == 1
    count()
