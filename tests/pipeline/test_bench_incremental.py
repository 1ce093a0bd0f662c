"""bench/incremental.py on the tiny model: adding benchmark facts fits only them, keeps the encoder
(the pseudo-edit pool does not move) and warm-starts the generator."""

from __future__ import annotations

import json

from tests.pipeline.conftest import small_params, write_params


def test_adding_benchmark_facts_keeps_the_encoder_and_fits_only_the_new(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from bench import incremental

    monkeypatch.setenv("MEG_TRACKING", "off")  # the benchmark turns tracking off; restored after the test

    params_path = write_params(tmp_path, small_params(tiny_model_dir))
    out = tmp_path / "incremental.json"
    assert incremental.main(["--n-base", "6", "--n-new", "3", "--params", str(params_path),
                             "--workdir", str(tmp_path / "work"), "--out", str(out), "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["added"] == {"new": 3, "overriding": 0, "duplicates": 0}
    assert result["encoder_rerun"] is False and "encoder" not in result["incremental_seconds"]
    assert result["incremental_fitted"] == 3 and result["incremental_cached"] == 6
    assert result["generator_warm_start"] is True
    assert "base build: 6 fits taken from the full arm" in capsys.readouterr().out
    assert set(result["full_seconds"]) == set(incremental.BUILD)
