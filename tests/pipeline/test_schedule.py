"""`meg pipeline schedule`: arguments validated before anything is contacted, a clear error when the
endpoint is unreachable, and the recurring run created with the compiled spec and the settings.

No Kubeflow Pipelines API server can run here, so the last test hands create_recurring_run a client
that records what it is asked (the only stand-in in these tests) and checks the spec it receives."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from meg.errors import ConfigError
from pipeline.schedule import EndpointError, create_recurring_run, validate_cron, validate_host
from tests.pipeline.conftest import ROOT, free_port, subprocess_env


@pytest.mark.parametrize("expr,want", [
    ("0 3 * * *", "0 0 3 * * *"),
    ("*/15 * * * *", "0 */15 * * * *"),
    ("0 0 3 ? * MON-FRI", "0 0 3 ? * MON-FRI"),
    ("30 0 2 1,15 JAN-JUN *", "30 0 2 1,15 JAN-JUN *"),
    ("@daily", "@daily"),
    ("@every 6h30m", "@every 6h30m"),
])
def test_valid_cron(expr, want):
    assert validate_cron(expr) == want


@pytest.mark.parametrize("expr,needle", [
    ("61 * * * *", "minute field: 61 is outside 0-59"),
    ("0 25 * * *", "hour field: 25 is outside 0-23"),
    ("0 3 * * 8", "day of week field: 8 is outside 0-6"),
    ("0 3 32 * *", "day of month field: 32 is outside 1-31"),
    ("* * *", "expected 5 fields"),
    ("0 3 * FOO *", "month field: 'FOO' is not a number"),
    ("0 5-2 * * *", "runs backwards"),
    ("*/0 * * * *", "bad step"),
    ("0 ? * * *", "'?' is allowed only in the day fields"),
    ("@sometimes", "unknown macro"),
])
def test_invalid_cron(expr, needle):
    with pytest.raises(ConfigError, match="cron") as e:
        validate_cron(expr)
    assert needle in str(e.value)


@pytest.mark.parametrize("url", ["kubeflow.example.com", "ftp://host/x", "http://", "https://host:99999/p"])
def test_invalid_host(url):
    with pytest.raises(ConfigError, match="host"):
        validate_host(url)


def test_unreachable_endpoint_is_a_clear_error(tmp_path):
    port = free_port()  # nothing listens there
    with pytest.raises(EndpointError, match=f"cannot reach the Kubeflow Pipelines endpoint http://127.0.0.1:{port}"):
        create_recurring_run(f"http://127.0.0.1:{port}", "0 3 * * *", "meg", params_path=ROOT / "params.yaml")
    done = subprocess.run([sys.executable, "-m", "meg.cli", "pipeline", "schedule", "--host", f"http://127.0.0.1:{port}",
                           "--cron", "0 3 * * *", "--experiment", "meg", "--params", str(ROOT / "params.yaml")],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 2
    assert "meg: error: cannot reach the Kubeflow Pipelines endpoint" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "meg.cli", "pipeline", "schedule", "--host", "http://127.0.0.1:1",
                           "--cron", "0 3 * *", "--experiment", "meg"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True)
    assert done.returncode == 2 and "expected 5 fields" in done.stderr


def test_bad_settings_are_rejected_before_contacting_anything(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("n_edits: 64", "n_edits: -3"))
    with pytest.raises(ConfigError, match="prepare: bad value for 'n_edits'"):
        create_recurring_run("http://127.0.0.1:1", "0 3 * * *", "meg", params_path=bad)
    with pytest.raises(ConfigError, match="name"):
        create_recurring_run("http://127.0.0.1:1", "0 3 * * *", "meg", name="Nightly Run", params_path=bad)


class RecordingClient:
    """Answers like a KFP client and keeps what it was asked."""

    calls: list = []

    def __init__(self, host):
        self.calls.append(("init", host))

    def get_experiment(self, experiment_name):
        raise RuntimeError("experiment not found")

    def create_experiment(self, name):
        self.calls.append(("create_experiment", name))
        return type("Exp", (), {"experiment_id": "exp-1"})()

    def create_recurring_run(self, **kw):
        kw["spec"] = yaml.safe_load(open(kw["pipeline_package_path"]).read())
        self.calls.append(("create_recurring_run", kw))
        return type("Run", (), {"recurring_run_id": "rr-1"})()


def test_recurring_run_gets_the_compiled_pipeline_and_the_settings(monkeypatch):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    RecordingClient.calls = []
    try:
        info = create_recurring_run(f"http://127.0.0.1:{port}/pipeline", "0 2 * * 1", "nightly", name="meg-nightly",
                                    params_path=ROOT / "params.yaml", shards=6, tracking_uri="http://mlflow:5000",
                                    cache_dir="/mnt/meg-cache", client_factory=RecordingClient)
    finally:
        server.close()
    assert "rr-1" in info and "0 0 2 * * 1" in info
    assert RecordingClient.calls[0] == ("init", f"http://127.0.0.1:{port}/pipeline")
    assert ("create_experiment", "nightly") in RecordingClient.calls
    kw = next(c[1] for c in RecordingClient.calls if c[0] == "create_recurring_run")
    assert kw["experiment_id"] == "exp-1" and kw["job_name"] == "meg-nightly"
    assert kw["cron_expression"] == "0 0 2 * * 1" and kw["max_concurrency"] == 1
    assert kw["params"]["params"] == (ROOT / "params.yaml").read_text()
    assert kw["params"]["tracking_uri"] == "http://mlflow:5000" and kw["params"]["cache_dir"] == "/mnt/meg-cache"
    assert kw["spec"]["pipelineInfo"]["name"] == "meg"
    loop = [t for c in kw["spec"]["components"].values() for t in c.get("dag", {}).get("tasks", {}).values()
            if "parameterIterator" in t]
    assert loop and loop[0]["iteratorPolicy"]["parallelismLimit"] == 6
