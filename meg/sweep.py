"""Layer sweep: where should the dynamic neuron sit in a given model?

For each candidate layer, fit one neuron per pseudo-edit and measure
- reliability: the share of edits whose greedy decoding reproduces the target after fitting;
- transfer: the share whose *own* fitted neuron also yields the target on the paraphrase (an upper
  bound on MeG's generality, which additionally needs the router and generator to deliver it);
- spill: the share of locality prompts whose first answer token changes when that neuron is
  (wrongly) left on, i.e. the damage of a routing mistake;
- subject spill (with a template bank): the same for a question on the edit's subject from another
  relation, one the fit did not keep (``fit.keep_questions``): the damage of routing such a question
  to the edit;
- seconds per edit.
Run it on pseudo-edits (the CounterFact train split), never on the evaluated edits.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from meg import evaluate, fit, lm, textbatch


def _lookup(prompts_to_rows: dict[str, int], weights: torch.Tensor):
    def weights_fn(prompts: list[str]):
        idx = [prompts_to_rows[p] for p in prompts]
        return weights[idx], torch.ones(len(idx), dtype=torch.bool)

    return weights_fn


def first_token_change(loaded: lm.LoadedModel, prompts: list[str], weights: torch.Tensor, layer: int, act: str) -> float:
    """% of prompts whose greedy first token changes with the matching row of ``weights`` on."""
    if not prompts:
        return 0.0
    base = evaluate.EditedLM(loaded).generate_ids(prompts, max_new_tokens=1)
    rows = {p: i for i, p in enumerate(prompts)}
    on = evaluate.EditedLM(loaded, _lookup(rows, weights), layer=layer, act=act).generate_ids(prompts, max_new_tokens=1)
    return 100.0 * sum(a != b for a, b in zip(base, on)) / len(prompts)


def subject_spill(loaded: lm.LoadedModel, edits, res: fit.FitResult, cfg: fit.FitConfig, bank) -> float:
    """% of held-out same-subject questions of another relation whose first token the edit's neuron changes."""
    def questions(e):  # as the fit draws them, one more: the last is held out
        return fit.keep_questions(e, bank, cfg.n_keep + 1, taken=bank.variants(e.prompt, e.subject, cfg.n_variants,
                                                                                e.target_new))

    pairs = [(i, qs[cfg.n_keep]) for i, e in enumerate(edits) if len(qs := questions(e)) > cfg.n_keep]
    return first_token_change(loaded, [q for _, q in pairs], res.weights[[i for i, _ in pairs]], res.layer, cfg.act)


def transfer_rate(loaded: lm.LoadedModel, edits, res: fit.FitResult, suffix: str, act: str) -> tuple[float, float]:
    """(paraphrase success %, locality first-token change %) with each edit's own neuron on."""
    paras = [e.paraphrases[0] for e in edits]
    rows = {p: i for i, p in enumerate(paras)}
    edited = evaluate.EditedLM(loaded, _lookup(rows, res.weights), layer=res.layer, act=act)
    tok = loaded.tokenizer
    suffix_ids = tok(suffix, add_special_tokens=False).input_ids if suffix else []
    ids = [tok(textbatch.target_text(e.target_new), add_special_tokens=False).input_ids + suffix_ids for e in edits]
    acc, _ = edited.score_ids(paras, ids)
    transfer = 100.0 * sum(a == 1.0 for a in acc) / len(edits)
    spill = first_token_change(loaded, [e.locality[0].prompt for e in edits], res.weights, res.layer, act)
    return transfer, spill


def sweep_layers(loaded: lm.LoadedModel, edits, layers: list[int], cfg: fit.FitConfig, progress=True,
                 bank=None) -> list[dict]:
    rows = []
    for layer in layers:
        t0 = time.time()
        res = fit.fit_edits(loaded, edits, replace(cfg, layer=layer), progress=progress, bank=bank)
        seconds = time.time() - t0
        transfer, spill = transfer_rate(loaded, edits, res, cfg.suffix, cfg.act)
        rep = res.report()
        rows.append({
            "layer": layer,
            "reliability": 100.0 * rep["success_rate"],
            "transfer": transfer,
            "spill": spill,
            **({"subject_spill": subject_spill(loaded, edits, res, cfg, bank)} if bank is not None else {}),
            "steps_median": rep["steps_median"],
            "seconds_per_edit": seconds / max(1, len(edits)),
            "delta_norm": rep["delta_norm_mean"],
        })
        if progress:
            print(rows[-1], flush=True)
    return rows
