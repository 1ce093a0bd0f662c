"""bench.scale: the combined table and the PNG of methods against the number of edits."""

import json

import pytest


def _metrics(score, rel=90.0, gen=50.0, loc=95.0):
    return {"score": score, "rel_ag": rel, "gen_ag": gen, "loc_ag": loc, "edit_seconds": 12.3, "peak_rss_mb": 1000.0}


def _run(tmp_path, name, dataset, n, methods, model="smollm2-135m", **extra):
    path = tmp_path / name
    path.write_text(json.dumps({"dataset": dataset, "n_edits": n, "model": model, "methods": methods, **extra}))
    return path


def test_table_and_plot_from_several_runs(tmp_path):
    from bench.scale import main

    files = [
        _run(tmp_path, "a.json", "counterfact", 256, {"none": _metrics(0.0), "meg": _metrics(97.0)}),
        _run(tmp_path, "b.json", "counterfact", 1000, {"ft": _metrics(3.6), "meg": _metrics(90.0)}),
        _run(tmp_path, "c.json", "counterfact", 1000, {"meg": _metrics(96.0)}),  # a rerun: given last, kept
        _run(tmp_path, "f.json", "counterfact", 4000, {"meg": _metrics(93.0)}, n_evaluated=1000),
        _run(tmp_path, "d.json", "zsre", 1037, {"meg": _metrics(80.0)}),  # another dataset: skipped
        _run(tmp_path, "e.json", "counterfact", 1000, {"meg": _metrics(1.0)}, model="gemma-3-270m"),  # other model
    ]
    table, png = tmp_path / "scale.md", tmp_path / "scale.png"
    assert main([str(f) for f in files] + ["--dataset", "counterfact", "--model", "smollm2-135m",
                                           "--methods", "none,ft,meg", "--table", str(table), "--png", str(png)]) == 0
    rows = [r for r in table.read_text().splitlines() if r.startswith("| ") and not r.startswith("| method")]
    assert [r.split(" | ")[:4] for r in rows] == [
        ["| none", "256", "256", "0.0"], ["| ft", "1,000", "1,000", "3.6"], ["| meg", "256", "256", "97.0"],
        ["| meg", "1,000", "1,000", "96.0"], ["| meg", "4,000", "1,000", "93.0"]]  # 4,000 applied, 1,000 asked
    assert "`c.json`" in rows[-2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not a readable JSON file"),
    ('{"dataset": "counterfact", "methods": {}}', "missing field 'n_edits'"),
    ('{"dataset": "counterfact", "n_edits": 0, "methods": {}}', "'n_edits' must be a positive integer"),
    ('{"dataset": "counterfact", "n_edits": 5, "methods": {"meg": {"score": 1, "rel_ag": 1, "gen_ag": 1}}}',
     "methods.meg: missing or non-numeric field 'loc_ag'"),
])
def test_bad_result_files_are_named(tmp_path, capsys, content, needle):
    from bench.scale import main

    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main([str(bad), "--dataset", "counterfact"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and needle in err


def test_no_matching_run_is_an_error(tmp_path, capsys):
    from bench.scale import main

    f = _run(tmp_path, "z.json", "zsre", 1037, {"meg": _metrics(80.0)})
    assert main([str(f), "--dataset", "counterfact"]) == 2
    assert "no run of dataset 'counterfact'" in capsys.readouterr().err
