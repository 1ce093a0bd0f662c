"""`mlflow models serve -m models:/meg-editor@champion` answers a REST request with the edited model's answers."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from meg import runner, tracking
from tests.pipeline.conftest import copy_workspace, free_port, stop, subprocess_env, wait_for_port


def _post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _wait_ready(port: int, proc, timeout: float = 240) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("the model server never answered /ping")


def test_served_champion_answers_like_the_bundle(built, tmp_path, monkeypatch):
    from meg.editor import EditedModel

    ws = copy_workspace(built, tmp_path / "ws", monkeypatch)  # small settings: gates at 0
    runner.run_stage("promote", ws / "params.yaml", ws, progress=False)
    tracking.configure(ws)
    assert tracking.Registry("meg-editor").champion("champion")["version"] == "1"

    edits = [json.loads(l) for l in (ws / "artifacts" / "prepare" / "edits.jsonl").read_text().splitlines()]
    prompts = [edits[0]["prompt"], edits[1]["paraphrases"][0], "The capital of France is"]
    model = EditedModel.load(ws / "artifacts" / "attach" / "bundle")
    want = model.answer(prompts)["answers"]  # what meg ask gives: chat turns, as the model has a chat template
    routed = [r["routed"] for r in model.explain(prompts)]

    port = free_port()
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}")
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", "models:/meg-editor@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    try:
        wait_for_port(port, proc, timeout=240)
        _wait_ready(port, proc)
        out = _post(port, "/invocations", {"dataframe_records": [{"prompt": p} for p in prompts]})
        rows = out["predictions"]
        assert [r["answer"] for r in rows] == want
        assert [r["routed"] for r in rows] == routed
        split = _post(port, "/invocations", {"dataframe_split": {"columns": ["prompt"], "data": [[prompts[0]]]}})
        assert split["predictions"][0]["answer"] == want[0]
    except BaseException:
        print((tmp_path / "serve.log").read_text()[-3000:])
        raise
    finally:
        stop(proc)
