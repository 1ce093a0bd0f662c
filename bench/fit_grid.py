"""Per-edit fitting settings side by side: reliability, transfer to never-fitted paraphrases, chat use, cost.

    python -m bench.fit_grid --n 128 --out OUT.json --chat \\
        --grid '[{"layer": 28}, {"layer": 28, "n_variants": 4, "stop": "margin", "n_prefixes": 2}]'

Each grid entry is a set of meg.fit.FitConfig fields plus ``layer`` and optionally ``min_similarity`` (of the
rewordings, meg.rewrite). The edits are the last ``n`` records of the CounterFact train split (pseudo-edits:
never evaluated). Rewordings are the ones a build would fit (model-written, meg.rewrite), under the closed
protocol (meg.probes): no probe of any benchmark and no paraphrase of these pseudo-edits, nor its template, is
ever fitted, so ``transfer`` (the share of edits whose own fitted neuron also produces the target, and the line
break, teacher-forced on the edit's CounterFact paraphrase) is measured on wordings never fitted. ``spill`` is
the share of neighbourhood prompts whose first answer token the neuron changes (meg.sweep). With ``--chat``,
the prompt and the paraphrase are also asked as user turns of the chat template (40 tokens, the neuron
released once the target is stated): ``chat_rel`` / ``chat_gen`` the share whose answer states the target,
``chat_repeats`` the share of those answers stating it three times or more.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from meg import fit, generation, lm, sweep
from meg.facts import load_benchmark


def fitting_bank(loaded, edits: list, n: int, min_similarity: float | None = None):
    """The template bank a build would give ``edits`` (their rewordings), with the edits' own probes blocked."""
    from meg.augment import TemplateBank
    from meg.editor import MegConfig, _answers, edit_rewordings, rewordings_for
    from meg.probes import Blocklist, benchmark_blocklist

    blocklist = benchmark_blocklist() | Blocklist.of(edits)
    rw = rewordings_for(loaded, MegConfig(), blocklist, progress=True)
    if min_similarity is not None:
        rw.min_similarity = min_similarity
    bank = TemplateBank(blocklist)
    bank.rewordings = edit_rewordings(edits, rw, n, user_paraphrases=False)
    return bank


def chat_transfer(loaded, edits: list, res: fit.FitResult, batch_size: int = 32) -> dict:
    """Chat-form success of each edit's own neuron on its prompt and paraphrase (oracle routing)."""
    tok = loaded.tokenizer
    out = {}
    for kind, texts in (("rel", [e.prompt for e in edits]), ("gen", [e.paraphrases[0] for e in edits])):
        answers = []
        for s in range(0, len(edits), batch_size):
            idx = list(range(s, min(s + batch_size, len(edits))))
            ids = generation.generate_ids(loaded, [generation.chat_prompt(tok, texts[i]) for i in idx],
                                          res.weights[idx], None, res.layer, "identity",
                                          generation.CHAT_MAX_NEW_TOKENS,
                                          release=[edits[i].target_new for i in idx], add_special_tokens=False)
            answers += [tok.decode(r, skip_special_tokens=True) for r in ids]
        ok = [generation.states(a, e.target_new) for a, e in zip(answers, edits)]
        out[f"chat_{kind}"] = 100.0 * sum(ok) / len(edits)
        out[f"chat_{kind}_repeats"] = 100.0 * sum(a.casefold().count(e.target_new.casefold()) >= 3
                                                  for a, e in zip(answers, edits)) / len(edits)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="pseudo-edits from the end of the CounterFact train split")
    p.add_argument("--grid", required=True, help="JSON list of FitConfig settings, each with 'layer'")
    p.add_argument("--chat", action="store_true", help="also measure chat-form success (slower)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    grid = json.loads(args.grid)
    if not isinstance(grid, list) or not all(isinstance(g, dict) and "layer" in g for g in grid):
        p.error("--grid: expected a JSON list of objects, each with a 'layer'")
    loaded = lm.load_model(args.model)
    edits = [e for e in load_benchmark("counterfact", "train")[-args.n:] if e.paraphrases and e.subject]
    rows = []
    for settings in grid:
        settings = dict(settings)
        layer = settings.pop("layer")
        min_similarity = settings.pop("min_similarity", None)
        cfg = fit.FitConfig(**settings)
        bank = fitting_bank(loaded, edits, max(cfg.n_variants, 1), min_similarity) if cfg.uses_bank else None
        t0 = time.time()
        res = fit.fit_edits(loaded, edits, replace(cfg, layer=layer), progress=False, bank=bank)
        seconds = time.time() - t0
        transfer, spill = sweep.transfer_rate(loaded, edits, res, cfg.suffix, cfg.act)
        rep = res.report()
        row = {"layer": layer, **settings, **({"min_similarity": min_similarity} if min_similarity else {}),
               "reliability": 100.0 * rep["success_rate"], "transfer": transfer, "spill": spill,
               "steps_median": rep["steps_median"], "seconds_per_edit": seconds / max(1, len(edits)),
               "rewordings_per_edit": (sum(len(v) for v in bank.rewordings.values()) / len(edits)) if bank else 0.0}
        if args.chat:
            row.update(chat_transfer(loaded, edits, res))
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
