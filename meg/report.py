"""Evaluation reports people read: one self-contained HTML file (tables, plots, router confusion, failures).

``write_report(out_dir, metrics, records, plots=None, confusion=None)`` writes ``out_dir/report.html``
and the PNG plots beside it (``out_dir/report_plots/*.png``). The HTML embeds every plot as base64,
links nothing and loads nothing, so it can be mailed, attached to an MLflow run or opened offline.

Inputs (what ``meg.benchmark`` produces):
- ``metrics``: ``{method: {metric: value}}`` or one method's ``{metric: value}``; percentages 0-100.
- ``records``: ``{method: [per-edit record]}`` or a list of records carrying a ``"method"`` key.
  A record has the evaluation's fields (``id``, ``target``, ``rel_out``, ``gen_out``, ``loc_out``,
  ``loc_label``, ``rel_ag``, ``gen_ag``, ``loc_ag``, ...) and, for MeG, routing fields from
  ``EditedModel.routing_records`` (``prompt``, ``paraphrase``, ``locality_prompt``,
  ``rel_routed``/``gen_routed``/``loc_routed``, ``rel_nearest``/``gen_nearest``/``loc_nearest``
  (edit ids), their ``*_confidence`` and ``fit_ok``).
- ``plots``: extra ``{title: png path}`` to embed after the generated ones.
- ``confusion``: ``{method: {name: value}}`` of router statistics (e.g. ``router_prompt_routed``),
  or ``meg.benchmark``'s extras ``{method: {"router_confusion": {...}, ...}}``; without it the
  confusion table is counted from the records' routing fields.

Why an edit failed, from its routing fields:
- "not routed": the router did not send the query to the edited knowledge;
- "routed to the wrong edit": it did, but the nearest edit is another one (its weights were generated
  for a different fact);
- "routed, weights did not produce the target" (and, when fitting had already failed for that edit,
  "fitting never reached the target");
- locality: "unrelated prompt routed to edit X" (a false positive changed the answer); without
  routing (other editors) the reason is only "the answer changed".
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import os
from pathlib import Path

from meg import plots

REPORT_NAME = "report"
TABLE_METRICS = ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf", "score", "es", "ps", "ns",
                 "edit_seconds", "eval_seconds", "peak_rss_mb")
PLOT_METRICS = ("rel_ag", "gen_ag", "loc_ag", "rel_tf", "gen_tf", "loc_tf", "score")
MAX_FAILURES = 25  # examples listed per method and kind


def _per_method(metrics: dict) -> dict[str, dict]:
    if metrics and all(isinstance(v, dict) for v in metrics.values()):
        return metrics
    return {"model": dict(metrics)}


def _records_by_method(records, methods: list[str]) -> dict[str, list[dict]]:
    if isinstance(records, dict):
        return {k: list(v) for k, v in records.items()}
    out: dict[str, list[dict]] = {}
    for r in records or []:
        out.setdefault(r.get("method", methods[0] if methods else "model"), []).append(r)
    return out


# ---- failure reasons


def failure_reason(record: dict, kind: str) -> str:
    """Why the edit failed for ``kind`` "rel" (edit prompt), "gen" (paraphrase) or "loc" (locality)."""
    routed = record.get(f"{kind}_routed")
    if kind == "loc":
        if routed is None:
            return "the answer changed"
        if routed:
            return f"unrelated prompt routed to edit {record.get('loc_nearest')}"
        return "not routed, yet the answer changed"
    if routed is None:
        return "the edited model did not produce the target"
    if not routed:
        return "not routed"
    if record.get(f"{kind}_nearest") not in (None, record.get("id")):
        return f"routed to the wrong edit ({record.get(f'{kind}_nearest')})"
    if record.get("fit_ok") is False:
        return "routed, but fitting never reached the target for this edit"
    return "routed, weights did not produce the target"


def failures(records: list[dict]) -> dict[str, list[dict]]:
    """Failed examples per kind, with prompt, expected, produced and reason."""
    out: dict[str, list[dict]] = {"rel": [], "gen": [], "loc": []}
    prompt_field = {"rel": "prompt", "gen": "paraphrase", "loc": "locality_prompt"}
    for r in records:
        for kind in out:
            if r.get(f"{kind}_ag", True):
                continue
            out[kind].append({
                "id": r.get("id"),
                "prompt": r.get(prompt_field[kind], ""),
                "expected": r.get("loc_label") if kind == "loc" else r.get("target"),
                "produced": r.get(f"{kind}_out"),
                "reason": failure_reason(r, kind),
            })
    return out


def reason_counts(fails: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in fails:
        key = f["reason"].split(" (")[0]
        if key.startswith("unrelated prompt routed"):
            key = "unrelated prompt routed to an edit"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def confusion_from_records(records: list[dict]) -> dict[str, float] | None:
    """Share (%) of edit prompts / paraphrases / locality prompts routed, to the right edit, elsewhere."""
    if not records or "rel_routed" not in records[0]:
        return None
    out: dict[str, float] = {}
    n = len(records)
    for kind, name in (("rel", "prompt"), ("gen", "paraphrase"), ("loc", "locality")):
        rows = [r for r in records if r.get(f"{kind}_routed") is not None]
        if not rows:
            continue
        routed = [r for r in rows if r[f"{kind}_routed"]]
        out[f"router_{name}_routed"] = 100.0 * len(routed) / len(rows)
        if kind != "loc":
            right = [r for r in routed if r.get(f"{kind}_nearest") == r.get("id")]
            out[f"router_{name}_right_edit"] = 100.0 * len(right) / len(rows)
            out[f"router_{name}_wrong_edit"] = 100.0 * (len(routed) - len(right)) / len(rows)
    out["n"] = float(n)
    return out


# ---- plots


def _plots(out_dir: Path, methods: dict[str, dict], records: dict[str, list[dict]]) -> dict[str, Path]:
    plt = plots.pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    keys = [k for k in PLOT_METRICS if any(isinstance(m.get(k), (int, float)) for m in methods.values())]
    if keys:
        made["Metrics per method"] = plots.comparison(methods, keys, out_dir / "metrics.png", "Metrics per method")
    for name, rows in records.items():
        conf = {kind: [r[f"{kind}_confidence"] for r in rows if r.get(f"{kind}_confidence") is not None]
                for kind in ("rel", "gen", "loc")}
        if not any(conf.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.4))
        labels = {"rel": "edit prompts", "gen": "paraphrases", "loc": "locality prompts"}
        for kind, values in conf.items():
            if values:
                ax.hist(values, bins=30, range=(0, 1), alpha=0.55, label=labels[kind])
        ax.set_xlabel("router confidence")
        ax.set_ylabel("prompts")
        ax.set_title(f"{name}: router confidence")
        ax.legend(fontsize=8)
        fig.tight_layout()
        made[f"{name}: router confidence"] = plots.save(fig, out_dir / f"router_confidence_{_slug(name)}.png")
    return made


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# ---- HTML


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1f}"
    return _esc(v)


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    h = "".join(f"<th>{_esc(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _img(path: Path, title: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{_esc(title)}" src="data:image/png;base64,{data}"><figcaption>{_esc(title)}</figcaption></figure>'


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f1f1f1}
table.text td{text-align:left;max-width:30em;overflow-wrap:anywhere}
figure{display:inline-block;margin:.5em 1em .5em 0}
figcaption{font-size:.85em;color:#555}
.note{color:#555;font-size:.9em}
"""


def render_html(methods: dict[str, dict], records: dict[str, list[dict]], images: dict[str, Path],
                confusion: dict[str, dict], title: str, context: dict | None = None) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>"]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ctx = " &middot; ".join(f"{_esc(k)}: {_esc(v)}" for k, v in (context or {}).items())
    parts.append(f"<p class='note'>Written {stamp}. {ctx}</p>")
    parts.append("<p class='note'>Percentages 0-100. AG: greedy generation of up to 20 tokens, first line, exact "
                 "match; TF: teacher-forced token accuracy; locality is judged against the pre-edit model's own "
                 "answer. Score: harmonic mean of the six. ES/PS/NS: CounterFact probability comparisons.</p>")
    keys = [k for k in TABLE_METRICS if any(k in m for m in methods.values())]
    parts.append("<h2>Metrics</h2>")
    parts.append(_table(["method"] + keys, [[_esc(n)] + [_fmt(m.get(k)) for k in keys] for n, m in methods.items()]))
    if images:
        parts.append("<h2>Plots</h2>" + "".join(_img(p, t) for t, p in images.items()))
    if confusion:
        parts.append("<h2>Router confusion</h2><p class='note'>Share of queries the router sent to the edited "
                     "knowledge (routed), to the query's own edit (right edit) or to another one (wrong edit). "
                     "Locality prompts should not be routed.</p>")
        for name, conf in confusion.items():
            rows = []
            for group in ("prompt", "paraphrase", "locality"):
                if f"router_{group}_routed" not in conf:
                    continue
                routed = conf.get(f"router_{group}_routed")
                right = conf.get(f"router_{group}_right_edit")
                wrong = conf.get(f"router_{group}_wrong_edit")
                if wrong is None and right is not None and routed is not None:
                    wrong = routed - right
                rows.append([_esc(group), _fmt(routed), _fmt(right), _fmt(wrong),
                             _fmt(None if routed is None else 100.0 - routed)])
            if rows:
                parts.append(f"<h3>{_esc(name)}</h3>")
                parts.append(_table(["queries", "routed %", "right edit %", "wrong edit %", "not routed %"], rows))
    parts.append("<h2>Failed edits</h2>")
    for name, rows in records.items():
        fails = failures(rows)
        parts.append(f"<h3>{_esc(name)}</h3>")
        labels = {"rel": "edit prompt (reliability)", "gen": "paraphrase (generality)", "loc": "locality"}
        summary = [[_esc(labels[k]), str(len(v)), _esc("; ".join(f"{r}: {c}" for r, c in reason_counts(v).items()))]
                   for k, v in fails.items()]
        parts.append(_table(["kind", "failed", "reasons"], summary, "text"))
        for kind, items in fails.items():
            if not items:
                continue
            shown = items[:MAX_FAILURES]
            parts.append(f"<h4>{_esc(labels[kind])}: {len(shown)} of {len(items)} failures</h4>")
            parts.append(_table(["id", "prompt", "expected", "produced", "why"],
                                [[_esc(f["id"]), _esc(f["prompt"]), _esc(f["expected"]), _esc(f["produced"]),
                                  _esc(f["reason"])] for f in shown], "text"))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: str | Path, metrics: dict, records, plots: dict[str, str | Path] | None = None,
                 confusion: dict | None = None, name: str = REPORT_NAME, title: str = "Knowledge editing report",
                 context: dict | None = None) -> Path:
    """Write ``out_dir/<name>.html`` (self-contained) and its PNG plots; returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = _per_method(metrics)
    by_method = _records_by_method(records, list(methods))
    images = _plots(out_dir / f"{name}_plots", methods, by_method)
    images.update({t: Path(p) for t, p in (plots or {}).items()})
    conf: dict[str, dict] = {}
    for m, rows in by_method.items():
        given = (confusion or {}).get(m) or {}
        given = given.get("router_confusion", given)  # meg.benchmark's extras nest it
        counted = confusion_from_records(rows)
        if given and any(str(k).startswith("router_") for k in given):
            conf[m] = {**(counted or {}), **{k: v for k, v in given.items() if str(k).startswith("router_")}}
        elif counted:
            conf[m] = counted
    page = render_html(methods, by_method, images, conf, title, context)
    path = out_dir / f"{name}.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
