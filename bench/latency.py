"""Latency of one question: the edited model against its own base model, in the same process.

    python -m bench.latency --bundle /tmp/meg-bench/smollm2-cf256 --questions 4 --repeats 3 --out OUT.json

Batch 1, exactly ``--new-tokens`` (20) new tokens (min = max, greedy), ``--threads`` torch threads.
Routed questions (edit prompts and CounterFact paraphrases that the router sends to the edited
knowledge) and unrelated ones (locality prompts of the same edits that it does not route) are
reported separately.

For every question and repeat, the base model and every edited variant run back to back, in an
order that rotates, and each variant's time is divided by the base time *of the same iteration*;
the reported ratio is the median of these paired ratios, so drifting load on a shared machine
cancels. Every time is taken twice: wall clock, and CPU time of the process (the work done; on a
machine shared with other jobs, waiting for a core inflates wall time but not CPU time; with one
torch thread the two agree on a quiet machine). Variants (each is what ``meg serve`` / ``meg ask`` run with that setting):

- ``served``: the bundle as it is (generator with the bundle's sampling steps, per question);
- ``steps=S``: ``--sample-steps S``;
- ``edit_cache``: ``--weight-cache edit`` (weights generated once per edit and reused);
- ``repeat``: the served path for a question asked before (the model keeps the weights of recent
  prompts, so the generator does not run again); every other variant asks a question new to it;
- parts of ``served``: encode (query encoder), route, sample (generator), generate (LM + neuron),
  and ``mlp_sample``: the sampling time of the MLP denoiser of the same size preset, 50 steps
  (untrained weights: it times the network, it says nothing of its quality).

Quality of the speed options, on ``--quality`` edits (batched, not timed): the share of edit prompts
and paraphrases answered with the new target (AG) under each variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from meg.answer import AnswerConfig, generate_rows, question_weights


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--questions", type=int, default=4, help="routed edit prompts, paraphrases and unrelated, each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--steps", default="10,5", help="generator sampling steps to try besides the bundle's")
    p.add_argument("--quality", type=int, default=64, help="edits whose answers check the speed options (0: off)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def counterfact_probes(model) -> tuple[list[str], list[str], list[str], list[str]]:
    """(edit prompts, paraphrases, locality prompts, targets) of the bundle's CounterFact edits."""
    from meg.facts import load_benchmark

    by_id = {e.id: e for e in load_benchmark("counterfact", "edit")}
    rows = [by_id[e["id"]] for e in model.info.get("edits") or [] if e["id"] in by_id]
    rows = [e for e in rows if e.paraphrases and e.locality]
    return ([e.prompt for e in rows], [e.paraphrases[0] for e in rows], [e.locality[0].prompt for e in rows],
            [e.target_new for e in rows])


def pick(model, texts: list[str], routed: bool, n: int) -> list[str]:
    _, mask, _, _ = model.route(texts)
    return [t for t, m in zip(texts, mask.tolist()) if m == routed][:n]


def mlp_sampler(model):
    """A generator with the MLP denoiser of the bundle generator's size preset, for timing only."""
    from meg.generator import PRESETS, GeneratorConfig, WeightGenerator

    src = model.generator
    size = next((k for k, v in PRESETS.items() if all(getattr(src.config, f) == x for f, x in v["dit"].items())), "s")
    gen = WeightGenerator(GeneratorConfig.from_preset(size, denoiser="mlp", sampler=src.config.sampler))
    gen._build(src.dim, src.cond_dim)
    gen.mean, gen.std, gen.w0 = src.mean, src.std, src.w0
    return gen


def forget(model) -> None:
    """Empty the model's per-prompt weight cache (if it has one), so the next question is a new one."""
    cache = getattr(model, "_cache", None)
    if cache is not None:
        cache.clear()


class Clock:
    """Wall time and CPU time of this process (all its threads), lap by lap."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def measure(model, questions: list[str], variants: dict[str, AnswerConfig], repeats: int, n_new: int,
            mlp=None) -> dict:
    """Paired timings: per (question, repeat), every variant and its parts against the base model.

    Every time is taken on two clocks: wall (what a user waits) and the process's CPU time (the work
    done; on a shared machine, waiting for a core inflates wall time but not CPU time).
    """
    loaded = model.loaded
    times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    ratios: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    routed_any = False

    def generate(q, w=None, mask=None):
        return generate_rows(loaded, [q], w, mask, model.layer, model.act, n_new, min_new_tokens=n_new)

    for r in range(repeats):
        for i, q in enumerate(questions):
            names = ["base"] + list(variants) + ["repeat", "parts"]
            shift = (r * len(questions) + i) % len(names)
            got: dict[str, tuple[float, float]] = {}
            clock = Clock()
            for name in names[shift:] + names[:shift]:
                if name == "repeat":  # the same question again: the model's per-prompt weight cache answers
                    model.weights_fn([q])
                clock.reset()
                if name == "base":
                    generate(q)
                elif name == "repeat":
                    w, mask = model.weights_fn([q])
                    generate(q, w, mask)
                elif name != "parts":
                    forget(model)  # a question not seen before
                    w, mask = question_weights(model, [q], variants[name])
                    generate(q, w, mask)
                else:  # the served path in pieces
                    forget(model)
                    emb = model.encoder.encode([q])
                    got["encode"] = clock.lap()
                    mask, _, _ = model.router.route(emb, [q], model.encoder.encode)
                    got["route"] = clock.lap()
                    w = torch.zeros(1, model.w0.numel())
                    if mask.any():
                        routed_any = True
                        w[0] = model.generator.sample(model.conditions([q], emb), seed=model.cfg.sample_seed)[0]
                    got["sample"] = clock.lap()
                    generate(q, w, mask)
                    got["generate"] = clock.lap()
                    if mlp is not None and mask.any():
                        mlp.sample(model.conditions([q], emb))
                        got["mlp_sample"] = clock.lap()
                    continue
                got[name] = clock.lap()
            for c, clock_name in enumerate(("wall", "cpu")):
                for k, v in got.items():
                    times[clock_name].setdefault(k, []).append(v[c])
                    if k != "base":
                        ratios[clock_name].setdefault(k, []).append(v[c] / got["base"][c])
    out: dict = {"n_questions": len(questions), "repeats": repeats}
    for clock_name in ("wall", "cpu"):
        t, rt = times[clock_name], ratios[clock_name]
        res = {
            "median_ms": {k: round(1000 * statistics.median(v), 1) for k, v in t.items()},
            "ratio_over_base": {k: round(statistics.median(v), 4) for k, v in rt.items()
                                if k in variants or k in ("repeat", "generate")},
            "share_of_base": {k: round(statistics.median(v), 4) for k, v in rt.items()
                              if k in ("encode", "route", "sample", "mlp_sample")},
        }
        if mlp is not None and routed_any:
            # the served path with the MLP denoiser's sampling time in place of the DiT's
            res["ratio_over_base"]["mlp_denoiser"] = round(statistics.median(
                [s - d + m for s, d, m in zip(rt["served"], rt["sample"], rt["mlp_sample"])]), 4)
        out[clock_name] = res
    return out


def quality(model, variants: dict[str, AnswerConfig], prompts: list[str], paras: list[str], targets: list[str],
            batch: int = 32) -> dict:
    """AG accuracy (answers == new target) of edit prompts and paraphrases under every variant (batched)."""
    from meg.evaluate import normalise_answer

    out = {}
    want = [normalise_answer(t) for t in targets]
    for name, cfg in variants.items():
        res = {}
        for kind, texts in (("edit_prompts", prompts), ("paraphrases", paras)):
            answers = []
            for i in range(0, len(texts), batch):
                answers += model.answer(texts[i:i + batch], sample_steps=cfg.sample_steps,
                                        weight_cache=cfg.weight_cache)["answers"]
            res[kind] = round(100.0 * sum(normalise_answer(a) == w for a, w in zip(answers, want)) / len(texts), 1)
        out[name] = res
        print(f"  quality {name}: AG edit prompts {res['edit_prompts']}%, paraphrases {res['paraphrases']}%",
              flush=True)
    return out


def main(argv=None) -> int:
    from meg.editor import EditedModel

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = EditedModel.load(args.bundle)
    gen = model.generator
    prompts, paras, locs, targets = counterfact_probes(model)
    routed = pick(model, prompts, True, args.questions) + pick(model, paras, True, args.questions)
    unrelated = pick(model, locs, False, args.questions)
    variants = {"served": AnswerConfig()}
    variants |= {f"steps={s}": AnswerConfig(sample_steps=int(s)) for s in args.steps.split(",") if s}
    variants["edit_cache"] = AnswerConfig(weight_cache="edit")
    print(f"bench.latency: {model.info.get('n_edits')} edits on {model.loaded.model_id}, layer {model.layer}, "
          f"generator {gen.config.denoiser} {gen.config.sample_steps} steps; {len(routed)} routed and "
          f"{len(unrelated)} unrelated questions, {args.repeats} repeats, {args.new_tokens} new tokens, "
          f"{args.threads} threads", flush=True)
    for cfg in variants.values():  # warm-up: first-call costs and the edit cache out of the way
        question_weights(model, routed[:1], cfg)
    generate_rows(model.loaded, routed[:1], max_new_tokens=2)
    result = {"bundle": str(args.bundle), "model": model.loaded.model_id, "n_edits": model.info.get("n_edits"),
              "new_tokens": args.new_tokens, "threads": args.threads,
              "generator": {k: getattr(gen.config, k) for k in ("denoiser", "width", "depth", "sample_steps",
                                                                "sampler")}}
    for name, qs in (("routed", routed), ("unrelated", unrelated)):
        t0 = time.time()
        result[name] = measure(model, qs, variants, args.repeats, args.new_tokens,
                               mlp_sampler(model) if name == "routed" else None)
        print(f"{name} ({time.time() - t0:.0f} s):", flush=True)
        for clock_name in ("wall", "cpu"):
            r = result[name][clock_name]
            print(f"  [{clock_name}] median ms " + ", ".join(f"{k} {v}" for k, v in r["median_ms"].items()), flush=True)
            print(f"  [{clock_name}] edited / base: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["ratio_over_base"].items()), flush=True)
            print(f"  [{clock_name}] share of a base answer: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["share_of_base"].items()), flush=True)
    if args.quality:
        n = min(args.quality, len(prompts))
        result["quality_ag"] = quality(model, variants, prompts[:n], paras[:n], targets[:n])
        result["quality_n"] = n
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
