"""Choose the baselines' hyperparameters on pseudo-edits, never on the evaluated edits.

    python -m bench.tune_baselines trace --out OUT.json [--n-facts 32]
    python -m bench.tune_baselines keys --out OUT.json [--layers 6,12,18,24,28]
    python -m bench.tune_baselines sweep --method memit --grid '[{"mom2_weight": 1e4}, ...]' --out OUT.json
    python -m bench.tune_baselines sweep --method memit --grid GRID --n-edits 1000 --eval-edits 200 --out OUT.json
    python -m bench.tune_baselines damage --method memit --n-edits 1000 --overrides '{"mom2_weight": 5e3}' --out OUT.json
    python -m bench.tune_baselines report OUT.json ...

Pseudo-edits come from the last 1,000 records of the CounterFact *train* split, which the key
statistics' corpus leaves out (``meg.baselines.corpus``).

``trace`` is a causal trace (ROME's, on the FFN): the subject's token embeddings are corrupted with
Gaussian noise (3x the embeddings' standard deviation), and for each layer l the FFN outputs of a
window of layers around l are restored at the subject's last token from the clean run; the
*indirect effect* of l is how much of the true object's probability that restores, averaged over
facts the model knows. MEMIT edits where that effect is high.

``sweep`` applies each configuration (registry settings + one override dict of the grid) to the
same pseudo-edits and evaluates it with the benchmark's protocol (``meg.evaluate``); every row
(overrides, metrics, what the editor reports, seconds) is written to OUT.json as soon as it is
done, and rows already there are skipped, so an interrupted sweep resumes. ``--eval-edits M`` applies
all ``--n-edits`` in one batch and asks the questions of the first M only: a setting whose effect
grows with the edit count (MEMIT's lambda, AlphaEdit's l2) is chosen at the size it will edit, for a
fraction of the evaluation. ``--fit-shard I/N`` only optimises and stores MEMIT's / AlphaEdit's z of
shard I of the pseudo-edits (every z setting of the grid), or GRACE's values of shard I of each
setting's codebook entries, so N processes do the costly part on N cores before the sweep finds it
all in the store:

    for i in 0 1; do python -m bench.tune_baselines sweep --method memit --grid GRID --n-edits 1000 \
        --out OUT.json --fit-shard $i/2 & done; wait

``damage`` applies MEMIT's or AlphaEdit's update of ``--n-edits`` pseudo-edits, then puts each edited
layer's share of it on the unedited model alone, and all of them together, and measures what that does to
the next token after the pseudo-edits' locality prompts: the mean KL divergence from the unedited
model, how often its top token stays, and the median relative change of that layer's FFN output over
the prompts' tokens. It says which layer breaks locality, and whether the layers' harm adds up or
compounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from meg import facts, lm, textbatch
from meg.baselines import locate
from meg.benchmark import run_methods
from meg.errors import ConfigError

HELD_OUT = 9000  # train records from here on are outside the statistics corpus


def pseudo_edits(n: int, offset: int = 0) -> list:
    pool = facts.load_benchmark("counterfact", "train")[HELD_OUT:]
    if offset + n > len(pool):
        raise ConfigError(f"{n} pseudo-edits from offset {offset} asked; the held-out train records are {len(pool)}")
    return pool[offset : offset + n]


# ------------------------------------------------------------------------------------ trace


@torch.no_grad()
def _known(loaded, pool, n: int) -> list[tuple]:
    """(edit, answer token) for facts whose true object's first token the model ranks first."""
    tok, model = loaded.tokenizer, loaded.model
    out = []
    for e in pool:
        if not (e.subject and e.target_old):
            continue
        ans = tok(textbatch.target_text(e.target_old), add_special_tokens=False).input_ids[0]
        ids = tok(e.prompt, return_tensors="pt").input_ids
        if int(model(input_ids=ids).logits[0, -1].argmax()) == ans:
            out.append((e, ans))
        if len(out) == n:
            break
    return out


@torch.no_grad()
@torch.no_grad()
def embedding_std(model, n_tokens: int = 8192, seed: int = 0) -> float:
    """The std of what the input embedding module outputs, over a fixed sample of token ids: the scale the
    corruption noise is measured in. Not the weight's std: some families scale in the module (Gemma
    multiplies by sqrt(hidden size), 25.3 for Gemma-3-270m), and the noise is added to its output."""
    emb = model.get_input_embeddings()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, emb.weight.shape[0], (1, n_tokens), generator=g)
    return float(emb(ids.to(emb.weight.device)).float().std())


def causal_trace(loaded, n_facts: int = 32, window: int = 5, samples: int = 3, seed: int = 0) -> dict:
    tok, model = loaded.tokenizer, loaded.model
    known = _known(loaded, pseudo_edits(1000), n_facts)
    emb = model.get_input_embeddings()
    noise = 3 * embedding_std(model)
    n_layers = lm.num_layers(model)
    layers = lm.decoder_layers(model)
    effects = torch.zeros(n_layers)
    base_p, low_p = [], []
    g = torch.Generator().manual_seed(seed)
    for e, ans in known:
        ids = tok(e.prompt, return_tensors="pt").input_ids
        span = locate.subject_tokens(tok, e.prompt, e.subject)
        if not span:
            continue
        last = span[-1]
        clean: dict[int, torch.Tensor] = {}
        hooks = [lm.ffn_module(model, l).register_forward_hook(
            lambda m, a, o, l=l: clean.__setitem__(l, o[0, last].clone())) for l in range(n_layers)]
        p_clean = torch.softmax(model(input_ids=ids).logits[0, -1], -1)[ans]
        for h in hooks:
            h.remove()
        rows = ids.repeat(samples * (n_layers + 1), 1)  # (S*(L+1), T): corrupted, then restored per layer
        eps = torch.randn(samples, len(span), emb.weight.shape[1], generator=g) * noise
        eps = eps.repeat(n_layers + 1, 1, 1)

        def corrupt(m, a, o):
            o = o.clone()
            o[:, span] += eps.to(o.dtype)
            return o

        def restore(l):
            def hook(m, a, o):
                o = o.clone()
                for r in range(rows.shape[0]):
                    target = r // samples - 1  # -1: the corrupted-only rows
                    if target >= 0 and abs(l - target) <= window // 2:
                        o[r, last] = clean[l]
                return o
            return hook

        hooks = [emb.register_forward_hook(corrupt)]
        hooks += [lm.ffn_module(model, l).register_forward_hook(restore(l)) for l in range(n_layers)]
        try:
            probs = torch.softmax(model(input_ids=rows).logits[:, -1], -1)[:, ans].view(n_layers + 1, samples).mean(1)
        finally:
            for h in hooks:
                h.remove()
        base_p.append(float(p_clean))
        low_p.append(float(probs[0]))
        effects += probs[1:] - probs[0]
    k = max(1, len(base_p))
    return {"n_facts": len(base_p), "window": window, "samples": samples, "noise": noise,
            "p_clean": sum(base_p) / k, "p_corrupted": sum(low_p) / k,
            "indirect_effect": [float(x) / k for x in effects]}


# ------------------------------------------------------------------------------------ GRACE key distances


@torch.no_grad()
def key_distances(loaded, layers: list[int], n: int, module: str = "ffn") -> list[dict]:
    """Per layer: how far GRACE keys of paraphrases and of unrelated prompts are from the edits' keys.

    A deferral radius between the two medians lets paraphrases in and keeps unrelated prompts out.
    """
    from meg.baselines.grace import _last_token_acts

    edits = [e for e in pseudo_edits(n) if e.paraphrases and e.locality]
    kind = "ffn_in" if module == "ffn" else "key"
    rows = []
    for layer in layers:
        acts = {}
        for name, texts in (("edit", [e.prompt for e in edits]), ("para", [e.paraphrases[0] for e in edits]),
                            ("loc", [e.locality[0].prompt for e in edits])):
            qs = [facts.EditRequest(f"q{i}", t, "x") for i, t in enumerate(texts)]
            acts[name] = _last_token_acts(loaded, qs, kind, layer, progress=False)
        d_para = (acts["para"] - acts["edit"]).norm(dim=1)  # to its own edit
        d_loc = torch.cdist(acts["loc"], acts["edit"]).min(dim=1).values  # to the nearest edit
        d_edit = torch.cdist(acts["edit"], acts["edit"]) + torch.eye(len(edits)) * 1e9
        rows.append({"layer": layer, "key_norm": float(acts["edit"].norm(dim=1).median()),
                     "para_to_own_edit": float(d_para.median()), "loc_to_nearest_edit": float(d_loc.median()),
                     "edit_to_nearest_edit": float(d_edit.min(dim=1).values.median()),
                     "para_within_loc_median": float((d_para < d_loc.median()).float().mean())})
    return rows


# ------------------------------------------------------------------------------------ sweep


def _editor(method: str, loaded, overrides: dict):
    from meg.baselines import registry
    from meg.baselines.alphaedit import AlphaEdit
    from meg.baselines.grace import Grace
    from meg.baselines.memit import MEMIT

    cls = {"memit": MEMIT, "alphaedit": AlphaEdit, "grace": Grace}[method]
    base = registry.overrides_for(method, loaded)
    merged = {**base, **overrides}
    for nested in ("target", "corpus"):
        if nested in base and nested in overrides:
            merged[nested] = {**base[nested], **overrides[nested]}
    return cls(registry.CONFIGS[method](**merged))


def store_shard(loaded, method: str, grid: list[dict], n_edits: int, shard: tuple[int, int]) -> int:
    """Optimise and store MEMIT's or AlphaEdit's z of shard (i, n) of the pseudo-edits for every
    configuration of ``grid`` (configurations with the same z settings share them), or GRACE's values of
    shard (i, n) of each configuration's codebook entries; returns the fewest the shard holds."""
    from meg.stages.fit import shard_of

    i, n = shard
    if method == "grace":
        edits = pseudo_edits(n_edits)
        print(f"tune_baselines: grace: values of entry shard {i}/{n}, {n_edits} pseudo-edits", flush=True)
        return min(_editor(method, loaded, o).store_values(loaded, edits, shard) for o in grid or [{}])
    mine = [e for e in pseudo_edits(n_edits) if shard_of(e.content_key, n) == i]
    print(f"tune_baselines: {method}: z of shard {i}/{n}: {len(mine)} of {n_edits} pseudo-edits", flush=True)
    return min(_editor(method, loaded, o).store_targets(loaded, mine) for o in grid or [{}])


def sweep(loaded, method: str, grid: list[dict], n_edits: int, out: Path, eval_edits: int | None = None) -> list[dict]:
    """Evaluate every configuration of ``grid`` not yet in ``out`` (locality labels computed once); with
    ``eval_edits`` the questions of the first that many edits only (all ``n_edits`` are applied)."""
    done = json.loads(out.read_text())["rows"] if out.is_file() else []
    asked = eval_edits if eval_edits and eval_edits < n_edits else None
    seen = {json.dumps(r["overrides"], sort_keys=True) for r in done
            if r["method"] == method and r["n_edits"] == n_edits and r.get("n_evaluated") == asked}
    todo = {f"cfg{i}": o for i, o in enumerate(grid) if json.dumps(o, sort_keys=True) not in seen}
    if not todo:
        return done
    edits = pseudo_edits(n_edits)
    editors = {name: _editor(method, loaded, o) for name, o in todo.items()}
    extras: dict[str, dict] = {}

    class Recording:  # keeps what each editor reports about its edit
        def __init__(self, name):
            self.name, self.inner = name, editors[name]

        def apply(self, loaded, edits):
            edited = self.inner.apply(loaded, edits)
            extras[self.name] = dict(getattr(edited, "extra_metrics", {}) or {})
            return edited

    def record(name: str, metrics: dict) -> None:
        row = {"method": method, "overrides": todo[name], "n_edits": len(edits), "n_evaluated": asked, **metrics,
               "extra": extras.get(name, {})}
        done.append(row)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": loaded.model_id, "rows": done}, indent=1, default=str))
        tmp.replace(out)
        print(f"{method} {json.dumps(row['overrides'], sort_keys=True)}: score {row['score']:.1f} "
              f"rel {row['rel_ag']:.1f} gen {row['gen_ag']:.1f} loc {row['loc_ag']:.1f} "
              f"({row['edit_seconds']:.0f} s)", flush=True)

    run_methods(loaded, edits, "counterfact-train-heldout", list(todo), editor_factory=Recording, on_result=record,
                n_evaluated=asked)
    return done


def _sweep_arguments(args: argparse.Namespace) -> tuple[list[dict], tuple[int, int] | None]:
    """The grid and the shard of a sweep's arguments; ConfigError naming what is wrong."""
    from meg.stages.fit import parse_shard

    try:
        grid = json.loads(args.grid)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--grid is not JSON: {e}") from e
    shard = parse_shard(args.fit_shard) if args.fit_shard is not None else None
    if args.eval_edits is not None and not 1 <= args.eval_edits <= args.n_edits:
        raise ConfigError(f"--eval-edits must be in 1..{args.n_edits} (--n-edits), got {args.eval_edits}")
    return grid, shard


def layer_damage(loaded, method: str, overrides: dict, n_edits: int, n_probes: int = 200) -> dict:
    """Per edited layer alone, and all together: the locality harm of a least-squares editor's update
    (see the module docstring)."""
    if method not in ("memit", "alphaedit"):
        raise ConfigError(f"damage: method {method!r} has no per-layer update; use memit or alphaedit")
    tok, model = loaded.tokenizer, loaded.model
    edits = pseudo_edits(n_edits)
    texts = [p.prompt for e in edits for p in e.locality][:n_probes]
    if not texts:
        raise ConfigError(f"damage: the first {n_edits} pseudo-edits have no locality prompts")
    editor = _editor(method, loaded, overrides)
    layers = list(editor.config_for(loaded).layers)
    weights = {l: lm.out_proj_weight(model, l) for l in layers}
    original = {l: w.detach().clone() for l, w in weights.items()}
    edited = editor.apply(loaded, edits)
    delta = {l: weights[l].detach() - original[l] for l in layers}
    edited.close()
    outs: dict[int, list] = {}
    hooks = [lm.ffn_out_proj(model, l).register_forward_hook(
        lambda mod, a, o, l=l: outs.setdefault(l, []).append(o.detach().float())) for l in layers]

    @torch.no_grad()
    def run() -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        outs.clear()
        logp = []
        for s in range(0, len(texts), 16):
            b = tok(texts[s : s + 16], return_tensors="pt", padding=True).to(model.device)
            logits = model(**b).logits.float().cpu()
            last = b.attention_mask.cpu().cumsum(1).argmax(1)  # the last real token, either padding side
            logp.append(torch.log_softmax(logits[torch.arange(len(last)), last], -1))
            keep = b.attention_mask.bool()
            for l in layers:
                outs[l][-1] = outs[l][-1][keep].cpu()
        return torch.cat(logp), {l: torch.cat(v) for l, v in outs.items()}

    try:
        base, base_out = run()
        rows = []
        for which in [[l] for l in layers] + [layers]:
            with torch.no_grad():
                for l in layers:
                    weights[l].copy_(original[l] + delta[l] if l in which else original[l])
            logp, out = run()
            row = {"layers": which, "kl": float((base.exp() * (base - logp)).sum(-1).mean()),
                   "top1_kept": 100.0 * float((base.argmax(-1) == logp.argmax(-1)).float().mean())}
            if len(which) == 1:
                l = which[0]
                change = (out[l] - base_out[l]).norm(dim=1) / base_out[l].norm(dim=1).clamp(min=1e-12)
                row.update(ffn_out_change=float(change.median()),
                           update_over_weight=float(delta[l].norm() / original[l].norm()))
            rows.append(row)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for l in layers:
                weights[l].copy_(original[l])
    return {"method": method, "overrides": overrides, "n_edits": n_edits, "n_probes": len(texts),
            "edit": dict(getattr(edited, "extra_metrics", {}) or {}), "rows": rows}


def objective(row: dict) -> float:
    """The Score; when it is 0 (a metric at 0), the mean of the six numbers breaks the tie."""
    six = [row[k] for k in ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf")]
    return row["score"] if row["score"] > 0 else sum(six) / len(six) / 100


def report(path: Path) -> str:
    """A markdown table of a sweep file, best first."""
    rows = sorted(json.loads(path.read_text())["rows"], key=objective, reverse=True)
    cols = ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf", "score", "edit_seconds")
    lines = ["| method | overrides | n | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        cells = " | ".join(f"{r[c]:.1f}" for c in cols)
        n = f"{r['n_edits']} ({r['n_evaluated']} asked)" if r.get("n_evaluated") else f"{r['n_edits']}"
        lines.append(f"| {r['method']} | `{json.dumps(r['overrides'], sort_keys=True)}` | {n} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace")
    t.add_argument("--n-facts", type=int, default=32)
    t.add_argument("--window", type=int, default=5)
    k = sub.add_parser("keys")
    k.add_argument("--layers", default="6,12,18,24,28")
    k.add_argument("--n-edits", type=int, default=128)
    k.add_argument("--module", default="ffn", choices=["ffn", "out_proj"])
    s = sub.add_parser("sweep")
    s.add_argument("--method", choices=["memit", "alphaedit", "grace"], required=True)
    s.add_argument("--grid", required=True, help="a JSON list of override dicts")
    s.add_argument("--n-edits", type=int, default=32)
    s.add_argument("--eval-edits", type=int, default=None, metavar="M",
                   help="apply all --n-edits, ask the questions of the first M only")
    s.add_argument("--fit-shard", default=None, metavar="I/N",
                   help="only store MEMIT's / AlphaEdit's z or GRACE's values of shard I of N, then stop")
    d = sub.add_parser("damage")
    d.add_argument("--method", choices=["memit", "alphaedit"], required=True)
    d.add_argument("--overrides", default="{}", help="a JSON dict on top of the registry's settings")
    d.add_argument("--n-edits", type=int, default=1000)
    d.add_argument("--n-probes", type=int, default=200)
    for q in (t, k, s, d):
        q.add_argument("--model", default=lm.DEFAULT_MODEL)
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("report")
    r.add_argument("sweeps", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "report":
        for path in args.sweeps:
            print(report(path) + "\n")
        return 0
    if args.cmd == "sweep":  # the arguments are checked before the model loads
        try:
            grid, shard = _sweep_arguments(args)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.cmd == "damage":
        try:
            overrides = json.loads(args.overrides)
            if not isinstance(overrides, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            print(f"error: bad value for --overrides: {args.overrides!r} ({e})", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    loaded = lm.load_model(args.model)
    if args.cmd == "trace":
        res = causal_trace(loaded, args.n_facts, args.window)
        args.out.write_text(json.dumps({"model": loaded.model_id, **res}, indent=1))
        for l, v in enumerate(res["indirect_effect"]):
            print(f"layer {l:>2}  indirect effect {v:+.3f}  " + "#" * max(0, int(100 * v)))
        print(f"{res['n_facts']} facts; p(clean) {res['p_clean']:.3f}, p(corrupted) {res['p_corrupted']:.3f}")
        return 0
    if args.cmd == "keys":
        rows = key_distances(loaded, [int(x) for x in args.layers.split(",")], args.n_edits, args.module)
        args.out.write_text(json.dumps({"model": loaded.model_id, "module": args.module, "rows": rows}, indent=1))
        for r in rows:
            print(r)
        return 0
    try:  # more pseudo-edits than the pool holds is found once the pool is read
        if args.cmd == "damage":
            res = {"model": loaded.model_id, **layer_damage(loaded, args.method, overrides, args.n_edits, args.n_probes)}
            args.out.write_text(json.dumps(res, indent=1, default=str))
            for r in res["rows"]:
                print(json.dumps(r), flush=True)
            return 0
        if shard is not None:
            stored = store_shard(loaded, args.method, grid, args.n_edits, shard)
            what = "values" if args.method == "grace" else "z"
            print(f"tune_baselines: shard {args.fit_shard}: {stored} {what} in the store", flush=True)
        else:
            sweep(loaded, args.method, grid, args.n_edits, args.out, args.eval_edits)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
