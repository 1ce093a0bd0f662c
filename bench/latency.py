"""Latency of one question: the edited model against its own base model, in the same process.

    python -m bench.latency --bundle /tmp/meg-bench/smollm2-cf256 --questions 8 --repeats 3 --out OUT.json

Batch 1, exactly ``--new-tokens`` (20) new tokens (min = max, greedy), ``--threads`` torch threads.
Routed questions (edit prompts that the router sends to the edited knowledge) and unrelated ones
(CounterFact locality prompts of the same edits that it does not route) are reported separately.
For every question and repeat the base model and each edited variant run back to back, in an order
that alternates, so that drifting load on a shared machine cancels in the ratios; every number is a
median.

An edited answer costs: encode (query encoder) + route (router) + sample (generator, S denoising
steps, routed questions only) + generate (the LM with the dynamic neuron). The what-ifs below are
measured in the same run, each the served pipeline with one part changed:

- ``steps=S``: the generator with S sampling steps instead of the bundle's; also reported is how
  many routed answers stay identical to those with the bundle's steps (a quality proxy);
- ``cached``: the generator skipped, as when weights are cached per query (a repeated question)
  or precomputed per edit;
- ``mlp``: the sampling cost of the MLP denoiser of the same size preset, 50 steps (its weights are
  untrained: this times the network, it says nothing of its quality).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from meg.answer import generate_rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--questions", type=int, default=8, help="routed and unrelated questions each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--steps", default="20,10,5", help="generator sampling steps to try besides the bundle's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def questions_for(model, n: int) -> tuple[list[str], list[str]]:
    """(routed edit prompts, unrouted unrelated prompts), n of each when the bundle has them."""
    from meg.facts import load_benchmark

    edits = model.info.get("edits") or []
    prompts = [e["prompt"] for e in edits]
    by_id = {e.id: e for e in load_benchmark("counterfact", "edit")}
    unrelated = [by_id[e["id"]].locality[0].prompt for e in edits if e["id"] in by_id and by_id[e["id"]].locality]
    unrelated += ["The capital of France is", "Water boils at a temperature of", "The author of Hamlet is"]
    _, mask_p, _, _ = model.route(prompts)
    _, mask_u, _, _ = model.route(unrelated)
    routed = [q for q, m in zip(prompts, mask_p.tolist()) if m][:n]
    unrouted = [q for q, m in zip(unrelated, mask_u.tolist()) if not m][:n]
    return routed, unrouted


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def mlp_sampler(model):
    """A generator with the MLP denoiser of the bundle generator's size preset, for timing only."""
    from meg.generator import PRESETS, GeneratorConfig, WeightGenerator

    src = model.generator
    size = next((k for k, v in PRESETS.items() if all(getattr(src.config, f) == x for f, x in v["dit"].items())), "s")
    cfg = GeneratorConfig.from_preset(size, denoiser="mlp", sample_steps=50, sampler=src.config.sampler)
    gen = WeightGenerator(cfg)
    gen._build(src.dim, src.cond_dim)
    gen.mean, gen.std, gen.w0 = src.mean, src.std, src.w0
    return gen


def measure(model, questions: list[str], routed: bool, steps: list[int], repeats: int, n_new: int) -> dict:
    loaded, gen = model.loaded, model.generator
    layer, act = model.layer, model.act
    mlp = mlp_sampler(model) if gen is not None and routed else None
    times: dict[str, list[float]] = {}
    answers: dict[str, list[list[int]]] = {}

    def add(name, value):
        times.setdefault(name, []).append(value)

    def run_generate(w, mask):
        return generate_rows(loaded, [q], w, mask, layer, act, n_new, min_new_tokens=n_new)

    for r in range(repeats):
        for i, q in enumerate(questions):
            order = (r + i) % 2  # alternate which side runs first
            for side in (("base", "edited") if order == 0 else ("edited", "base")):
                t = Timer()
                if side == "base":
                    generate_rows(loaded, [q], max_new_tokens=n_new, min_new_tokens=n_new)
                    add("base", t.lap())
                    continue
                # the served path, as meg.answer.answer_rows runs it
                w, mask = model.weights_fn([q])
                ids = run_generate(w, mask)
                add("edited", t.lap())
                if r == 0:
                    answers.setdefault("default", []).append(ids[0])
                # its parts
                emb = model.encoder.encode([q])
                add("encode", t.lap())
                m, _, _ = model.router.route(emb)
                add("route", t.lap())
                if routed and gen is not None:
                    gen.sample(emb, seed=model.cfg.sample_seed)
                    add("sample", t.lap())
                run_generate(w, mask)
                add("generate", t.lap())
                if not routed:
                    continue
                for s in steps:
                    ws = gen.sample(emb, steps=s, seed=model.cfg.sample_seed)
                    add(f"sample_steps={s}", t.lap())
                    if r == 0:
                        answers.setdefault(f"steps={s}", []).append(run_generate(ws, m)[0])
                        t.lap()
                if mlp is not None:
                    mlp.sample(emb, seed=0)
                    add("sample_mlp", t.lap())
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"n_questions": len(questions), "repeats": repeats, "median_seconds": med,
           "ratio_edited_over_base": med["edited"] / med["base"]}
    parts = med["encode"] + med["route"] + med["generate"]
    out["ratio_generate_with_neuron_over_base"] = med["generate"] / med["base"]
    if routed and gen is not None:
        out["sample_share_of_edited"] = med["sample"] / med["edited"]
        what_if = {"cached": parts / med["base"]}
        for s in steps:
            what_if[f"steps={s}"] = (parts + med[f"sample_steps={s}"]) / med["base"]
        if mlp is not None:
            what_if["mlp"] = (parts + med["sample_mlp"]) / med["base"]
        out["what_if_ratio"] = what_if
        out["bundle_sample_steps"] = gen.config.sample_steps
        out["answers_same_as_bundle_steps"] = {
            k: sum(a == b for a, b in zip(v, answers["default"])) / len(v) for k, v in answers.items()
            if k != "default"}
    else:
        out["what_if_ratio"] = {}
    return out


def main(argv=None) -> int:
    from meg.editor import EditedModel

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = EditedModel.load(args.bundle)
    steps = [int(s) for s in args.steps.split(",") if s]
    routed, unrelated = questions_for(model, args.questions)
    print(f"bench.latency: {model.info.get('n_edits')} edits on {model.loaded.model_id}, layer {model.layer}; "
          f"{len(routed)} routed, {len(unrelated)} unrelated questions, {args.repeats} repeats, "
          f"{args.new_tokens} new tokens, {args.threads} threads", flush=True)
    generate_rows(model.loaded, ["Warm-up"], max_new_tokens=2)  # first-call costs out of the way
    model.answer(["Warm-up", routed[0]] if routed else ["Warm-up"])
    result = {"bundle": str(args.bundle), "model": model.loaded.model_id, "n_edits": model.info.get("n_edits"),
              "new_tokens": args.new_tokens, "threads": args.threads, "generator": (
                  {k: getattr(model.generator.config, k) for k in ("denoiser", "width", "depth", "sample_steps",
                                                                   "sampler")} if model.generator else None)}
    for name, qs, is_routed in (("routed", routed, True), ("unrelated", unrelated, False)):
        t0 = time.time()
        result[name] = measure(model, qs, is_routed, steps, args.repeats, args.new_tokens)
        r = result[name]
        print(f"{name}: edited/base = {r['ratio_edited_over_base']:.3f}  "
              + "  ".join(f"{k} {v * 1000:.1f} ms" for k, v in r["median_seconds"].items())
              + f"  ({time.time() - t0:.0f} s)", flush=True)
        for k, v in r["what_if_ratio"].items():
            print(f"  what if {k}: edited/base = {v:.3f}", flush=True)
        for k, v in r.get("answers_same_as_bundle_steps", {}).items():
            print(f"  {k}: {100 * v:.0f}% of answers identical to the bundle's setting", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
