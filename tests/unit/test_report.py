"""HTML reports: self-contained, with tables, plots, router confusion and failed edits with reasons."""

from __future__ import annotations

import base64
import re

import pytest

from meg.report import confusion_from_records, failure_reason, failures, write_report


def rec(i, **kw):
    base = {"id": f"e{i}", "target": "Paris", "rel_out": "Paris", "gen_out": "Paris", "loc_out": "x", "loc_label": "x",
            "rel_ag": True, "gen_ag": True, "loc_ag": True, "prompt": f"p{i}", "paraphrase": f"q{i}",
            "locality_prompt": f"l{i}", "rel_routed": True, "rel_nearest": f"e{i}", "gen_routed": True,
            "gen_nearest": f"e{i}", "loc_routed": False, "loc_nearest": "e0", "rel_confidence": 0.9,
            "gen_confidence": 0.7, "loc_confidence": 0.2, "fit_ok": True}
    return base | kw


def test_every_failure_gets_its_reason():
    assert failure_reason(rec(1, gen_ag=False, gen_routed=False), "gen") == "not routed"
    assert failure_reason(rec(1, gen_ag=False, gen_nearest="e7"), "gen") == "routed to the wrong edit (e7)"
    assert failure_reason(rec(1, rel_ag=False), "rel") == "routed, weights did not produce the target"
    assert "fitting never reached" in failure_reason(rec(1, rel_ag=False, fit_ok=False), "rel")
    assert failure_reason(rec(1, loc_ag=False, loc_routed=True, loc_nearest="e3"), "loc") == \
        "unrelated prompt routed to edit e3"
    plain = {"id": "e1", "rel_ag": False, "loc_ag": False}  # another editor: no routing fields
    assert failure_reason(plain, "rel") == "the edited model did not produce the target"
    assert failure_reason(plain, "loc") == "the answer changed"
    f = failures([rec(1, gen_ag=False, gen_out="Rome", gen_routed=False)])
    assert f["gen"] == [{"id": "e1", "prompt": "q1", "expected": "Paris", "produced": "Rome", "reason": "not routed"}]
    assert f["rel"] == [] and f["loc"] == []


def test_confusion_is_counted_from_routing_fields():
    rows = [rec(0), rec(1, gen_nearest="e0"), rec(2, gen_routed=False, loc_routed=True), rec(3)]
    c = confusion_from_records(rows)
    assert c["router_prompt_routed"] == 100.0 and c["router_prompt_right_edit"] == 100.0
    assert c["router_paraphrase_routed"] == 75.0 and c["router_paraphrase_right_edit"] == 50.0
    assert c["router_paraphrase_wrong_edit"] == 25.0 and c["router_locality_routed"] == 25.0
    assert confusion_from_records([{"id": "x"}]) is None


def test_report_is_self_contained(tmp_path):
    metrics = {"none": {"rel_ag": 0.0, "gen_ag": 0.0, "loc_ag": 100.0, "score": 0.0},
               "meg": {"rel_ag": 50.0, "gen_ag": 25.0, "loc_ag": 75.0, "score": 40.0, "edit_seconds": 3.0}}
    records = {"none": [{"id": "e0", "target": "Paris", "rel_out": "Lyon", "rel_ag": False, "gen_ag": False,
                         "loc_ag": True, "gen_out": "Lyon"}],
               "meg": [rec(0, rel_ag=False, rel_out="Lille <b>"), rec(1, gen_ag=False, gen_routed=False),
                       rec(2, loc_ag=False, loc_routed=True, loc_nearest="e1", loc_out="Paris")]}
    path = write_report(tmp_path, metrics, records,
                        confusion={"meg": {"router_confusion": {"router_prompt_routed": 100.0}}})
    page = path.read_text()
    assert path == tmp_path / "report.html"
    assert not re.search(r"""(src|href)=["']?(https?:|//|[^"'d])""", page)  # nothing loaded from elsewhere
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert (tmp_path / "report_plots" / "metrics.png").is_file()
    assert "router_confidence_meg.png" in {p.name for p in (tmp_path / "report_plots").iterdir()}
    for needle in ("Router confusion", "routed, weights did not produce the target", "not routed",
                   "unrelated prompt routed to edit e1", "the edited model did not produce the target",
                   "Lille &lt;b&gt;", "<td>50.0</td>"):
        assert needle in page, needle
    assert "Lille <b>" not in page  # produced text is escaped


def test_one_methods_flat_metrics_record_list_and_extra_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "curve.png")
    plt.close(fig)
    path = write_report(tmp_path, {"rel_ag": 10.0, "score": 5.0}, [rec(0, rel_ag=False)], name="eval",
                        plots={"training curve": tmp_path / "curve.png"})
    page = path.read_text()
    assert path.name == "eval.html" and "<td>10.0</td>" in page
    assert "training curve" in page and page.count("data:image/png;base64,") >= 3


def test_benchmark_records_carry_routing_and_reach_the_report(tmp_path):
    from meg.benchmark import run_methods
    from meg.editor import MegEditor
    from meg.evaluate import NoEdit
    from tests.tiny_bundle import tiny_config, tiny_edits, tiny_loaded

    edits = tiny_edits()
    factory = {"none": NoEdit, "meg": lambda: MegEditor(tiny_config(), progress=False)}
    result = run_methods(tiny_loaded(), edits, "counterfact", ["none", "meg"],
                         editor_factory=lambda name: factory[name]())
    meg_rows = result.records["meg"]
    assert all(r["rel_routed"] is not None and r["prompt"] == e.prompt for r, e in zip(meg_rows, edits))
    assert "rel_routed" not in result.records["none"][0]
    path = write_report(tmp_path, result.methods, result.records, confusion=result.extras)
    page = path.read_text()
    assert "Router confusion" in page and "Failed edits" in page
    n_fail = sum(not r["rel_ag"] for r in meg_rows)
    assert f"edit prompt (reliability): {min(n_fail, 25)} of {n_fail} failures" in page or n_fail == 0


def test_benchmark_asks_only_the_first_edits_when_told_but_applies_all(tmp_path):
    from meg.benchmark import run_methods
    from meg.editor import MegEditor
    from tests.tiny_bundle import tiny_config, tiny_edits, tiny_loaded

    edits = tiny_edits()
    applied = {}

    def factory(name):
        editor = MegEditor(tiny_config(), progress=False)
        apply = editor.apply
        editor.apply = lambda loaded, given: applied.setdefault("n", len(given)) and apply(loaded, given)
        return editor

    result = run_methods(tiny_loaded(), edits, "counterfact", ["meg"], editor_factory=factory, n_evaluated=2)
    assert applied["n"] == len(edits) > 2
    assert [r["prompt"] for r in result.records["meg"]] == [e.prompt for e in edits[:2]]
    assert result.summary()["n_evaluated"] == 2 and result.summary()["n_edits"] == len(edits)
    with pytest.raises(ValueError, match="n_evaluated"):
        run_methods(tiny_loaded(), edits, "counterfact", ["meg"], editor_factory=factory, n_evaluated=len(edits) + 1)


def test_locality_labels_are_kept_and_reused(tmp_path, monkeypatch):
    from meg import benchmark, evaluate
    from tests.tiny_bundle import tiny_edits, tiny_loaded

    edits, loaded = tiny_edits(), tiny_loaded()
    first = benchmark.locality_labels(loaded, edits, 4, tmp_path)
    assert len(list(tmp_path.glob("locality-labels-*.json"))) == 1

    def fail(*a, **k):
        raise AssertionError("computed again")

    monkeypatch.setattr(evaluate, "locality_labels", fail)
    assert benchmark.locality_labels(loaded, edits, 4, tmp_path) == first
    with pytest.raises(AssertionError, match="computed again"):  # other prompts or batch size: another key
        benchmark.locality_labels(loaded, edits[:2], 4, tmp_path)
    with pytest.raises(AssertionError, match="computed again"):
        benchmark.locality_labels(loaded, edits, 8, tmp_path)
