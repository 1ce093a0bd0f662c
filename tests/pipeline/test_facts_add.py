"""`meg facts add FILE`: validated additions to the versioned fact store, data.dvc kept current."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from meg import config
from meg.errors import FactsError
from meg.factstore import FactStore
from meg.stages.prepare import edit_set
from tests.pipeline.conftest import ROOT, subprocess_env


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "meg.cli", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True)


def _current(root):
    cfg = config.section_config(config.load_params(root / "params.yaml"), "prepare")
    return cfg, edit_set(cfg, root)[0]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_store_counts_new_overriding_and_duplicate_facts(workspace):
    cfg, current = _current(workspace)
    first = current[0]
    src = _jsonl(workspace / "week1.jsonl", [
        {"prompt": "The chief engineer of Ganymede Station is", "target_new": "Ada Okafor"},
        {"prompt": first.prompt, "target_new": first.target_new},  # already so
        {"prompt": first.prompt.upper(), "target_new": "Basque"},  # same prompt (normalised), new target
    ])
    store = FactStore(workspace / cfg.data_dir / cfg.facts_dir)
    report = store.add(src, current)
    # rows 2 and 3 share a prompt within the file: the later one wins there already
    assert (report.n_read, report.n_new, report.n_override, report.n_duplicate) == (2, 1, 1, 0)
    assert report.written.name == "0001-week1.jsonl"
    stored = store.load()
    assert {e.target_new for e in stored} >= {"Ada Okafor"}
    edits, rep = edit_set(cfg, workspace)
    by_prompt = {e.prompt.casefold(): e for e in edits}
    assert by_prompt[first.prompt.casefold()].target_new == "Basque"  # the later fact wins
    assert rep["n_dropped"] == 1 and "the later one wins" in rep["dropped"][0]
    # the same file again brings nothing new: the store is unchanged
    again = store.add(src, edits)
    assert again.written is None and again.n_duplicate == again.n_read
    assert [p.name for p in store.files()] == ["0001-week1.jsonl"]
    second = store.add(_jsonl(workspace / "week 2!.jsonl", [{"prompt": "Mars has moons named", "target_new": "Phobos"}]),
                       edits)
    assert second.written.name == "0002-week-2.jsonl"


def test_bad_facts_are_rejected_and_the_store_is_unchanged(workspace):
    cfg, current = _current(workspace)
    store = FactStore(workspace / cfg.data_dir / cfg.facts_dir)
    bad = _jsonl(workspace / "bad.jsonl", [{"prompt": "ok prompt is", "target_new": "fine"},
                                           {"prompt": "", "target_new": "x"},
                                           {"prompt": "numbers are", "target_new": 7}])
    with pytest.raises(FactsError) as e:
        store.add(bad, current)
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "record 2: field 'prompt'" in lines[0] and "record 3: field 'target_new'" in lines[1]
    assert store.files() == []
    clash = _jsonl(workspace / "clash.jsonl", [{"id": current[0].id, "prompt": "Another prompt entirely is",
                                                "target_new": "y"}])
    with pytest.raises(FactsError, match=f"'{current[0].id}' is already used"):
        store.add(clash, current)
    assert store.files() == []


def test_cli_exit_codes_and_messages(workspace):
    bad = _jsonl(workspace / "bad.jsonl", [{"prompt": "x is", "target_new": ""}])
    done = _cli(["facts", "add", str(bad), "--no-dvc"], workspace)
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [f"{bad}:record 1: field 'target_new': is empty"]
    assert not (workspace / "data" / "facts").exists()
    good = _jsonl(workspace / "good.jsonl", [{"prompt": "The mascot of the Zorbl team is", "target_new": "a heron"}])
    done = _cli(["facts", "add", str(good), "--no-dvc"], workspace)
    assert done.returncode == 0, done.stderr
    assert "1 new, 0 overriding, 0 duplicates" in done.stdout
    assert (workspace / "data" / "facts" / "0001-good.jsonl").is_file()


def test_cli_updates_data_dvc(workspace):
    """In a DVC repository, an addition is followed by `dvc add data`: data.dvc names the new content."""
    shutil.copy(ROOT / "data.dvc", workspace / "data.dvc")
    (workspace / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", workspace / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
    before = yaml.safe_load((workspace / "data.dvc").read_text())["outs"][0]
    good = _jsonl(workspace / "new.jsonl", [{"prompt": "The mascot of the Zorbl team is", "target_new": "a heron"}])
    done = _cli(["facts", "add", str(good)], workspace)
    assert done.returncode == 0, done.stdout + done.stderr
    after = yaml.safe_load((workspace / "data.dvc").read_text())["outs"][0]
    assert after["md5"] != before["md5"] and after["nfiles"] == before["nfiles"] + 1
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "data.dvc"], cwd=workspace,
                            env=subprocess_env(), capture_output=True, text=True)
    assert "up to date" in status.stdout
