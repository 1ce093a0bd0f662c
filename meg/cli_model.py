"""`meg edit`, `meg ask`, `meg chat`, `meg serve`: make an edited model and use it.

MODEL (ask, chat, serve) is a bundle directory written by `meg edit` or a registry reference such
as `models:/meg-editor@champion`.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("edit", help="edit a model with a fact file in one command; writes a bundle")
    e.add_argument("facts", help="fact file (JSONL, CSV, CounterFact/ZsRE JSON; see `meg facts validate`)")
    e.add_argument("--model", default="smollm2-135m", help="base model: registry name, local directory or hub id")
    e.add_argument("--out", required=True, help="bundle directory to write")
    e.add_argument("--config", default=None, help="JSON or YAML file of MegConfig settings (default: built-in)")
    e.add_argument("--work-dir", default=None, help="resumable intermediate results (default: OUT.work)")
    e.add_argument("--limit", type=int, default=None, help="edit only the first N facts")
    e.add_argument("--format", default="auto", choices=["auto", "counterfact", "zsre", "json", "jsonl", "csv"])
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_edit)

    a = sub.add_parser("ask", help="answer questions with an edited model")
    a.add_argument("model", help="bundle directory or models:/NAME@ALIAS")
    a.add_argument("questions", nargs="+")
    a.add_argument("--explain", action="store_true",
                   help="show routing, nearest edits, confidence and the base model's answer")
    a.add_argument("--json", action="store_true", help="print the service's JSON response instead of text")
    a.add_argument("--max-new-tokens", type=int, default=None, help="default: 40 in chat, 20 completing")
    _chat_option(a)
    a.add_argument("--threads", type=int, default=None)
    _speed_options(a)
    a.set_defaults(func=_ask)

    c = sub.add_parser("chat", help="interactive questions to an edited model (':explain' toggles explanations)")
    c.add_argument("model", help="bundle directory or models:/NAME@ALIAS")
    c.add_argument("--explain", action="store_true")
    c.add_argument("--max-new-tokens", type=int, default=None, help="default: 40 in chat, 20 completing")
    _chat_option(c)
    c.add_argument("--threads", type=int, default=None)
    _speed_options(c)
    c.set_defaults(func=_chat)

    s = sub.add_parser("serve", help="HTTP service: POST /v1/answer, OpenAI-compatible /v1/chat/completions and "
                                      "/v1/completions, GET /health, /metrics, /openapi.json")
    s.add_argument("model", help="bundle directory or models:/NAME@ALIAS")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--base", action="store_true",
                   help="serve the bundle's unedited base model (a reference for A/B and benchmarks)")
    s.add_argument("--max-batch-size", type=int, default=32, help="questions per batched pass")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    s.add_argument("--max-queue", type=int, default=256, help="questions waiting at most (then 503)")
    s.add_argument("--max-questions", type=int, default=32, help="questions per request at most (then 413)")
    s.add_argument("--max-chars", type=int, default=2000, help="characters per question at most (then 413)")
    s.add_argument("--max-tokens-per-question", type=int, default=1024,
                   help="tokens of the model's input per question at most (then 413)")
    s.add_argument("--max-new-tokens", type=int, default=None, help="default: 40 in chat, 20 completing")
    s.add_argument("--max-completion-tokens", type=int, default=512,
                   help="largest max_tokens an OpenAI request may ask for (then 422)")
    s.add_argument("--model-name", default="meg", help="the model id of the OpenAI endpoints (GET /v1/models)")
    s.add_argument("--api-key", default=None,
                   help="bearer token required by every request but the short /health (default: $MEG_API_KEY); "
                        "required when --host is not loopback")
    _chat_option(s)
    s.add_argument("--threads", type=int, default=None)
    _speed_options(s)
    s.set_defaults(func=_serve)


def _chat_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", action="store_true",
                   help="complete the question as raw text (first line) instead of asking it as a user turn of the "
                        "model's chat template (the default when the model has one)")


def _answer_options(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, **({"chat": False} if args.raw else {}), **_speed(args)}


def _speed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-steps", type=int, default=None,
                   help="generator denoising steps per routed question (default: the bundle's)")
    p.add_argument("--weight-cache", choices=["off", "edit"], default="off",
                   help="'edit': generate each edit's weights once and reuse them (faster; see docs/serving.md)")


def _speed(args: argparse.Namespace) -> dict:
    return {"sample_steps": args.sample_steps, "weight_cache": args.weight_cache}


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _edit(args: argparse.Namespace) -> int:
    from meg.bundle import EditJob, load_config, make_bundle

    _threads(args.threads)
    job = EditJob(facts=args.facts, out=args.out, model=args.model, work_dir=args.work_dir, limit=args.limit,
                  fmt=args.format)
    cfg = load_config(args.config)
    model = make_bundle(job, cfg, progress=not args.quiet)
    fitted = model.info.get("fit", {})
    print(f"meg: edited {model.info.get('n_edits')} facts into {model.loaded.model_id} "
          f"(layer {model.layer}; fitting succeeded for {fitted.get('n_success', '?')})")
    print(f"meg: bundle written to {job.out}")
    print(f"meg: try it:  meg ask {job.out} \"<question>\" --explain")
    return 0


def _ask(args: argparse.Namespace) -> int:
    from meg.bundle import open_model

    _threads(args.threads)
    model = open_model(args.model)
    out = model.answer(args.questions, explain=args.explain, **_answer_options(args))
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    for i, (q, a) in enumerate(zip(args.questions, out["answers"])):
        if args.explain:
            print(format_explanation(out["explanations"][i]))
        else:
            print(f"{q} -> {a}" if len(args.questions) > 1 else a)
    return 0


# What each routing reason (meg.router) means to someone reading an explanation
REASONS = {
    "routed": "close to an edited fact",
    "threshold": "not close enough to any edited fact",
    "no_subject": "it names no edited subject (subject gate)",
    "relation": "it names an edited subject but asks another fact of it (relation check)",
}


def format_explanation(e: dict) -> str:
    """A few readable lines for one explained answer."""
    lines = [f"Q: {e['question']}",
             f"  edited answer: {e['answer']}",
             f"  base answer:   {e['base_answer']}",
             f"  routed to edited knowledge: {'yes' if e['routed'] else 'no'} (confidence {e['confidence']:.3f})"
             + (", an edit's own prompt: its fitted weights" if e.get("exact") else "")]
    why = REASONS.get(e.get("reason", ""))
    if why and not e.get("exact"):
        if "relation_cosine" in e:
            why += f" (subject-masked cosine {e['relation_cosine']:.3f}, cut {e['relation_cut']:.3f})"
        lines.append(f"  why: {why}")
    for n in e.get("nearest_edits", []):
        what = f"{n.get('prompt', '')} -> {n.get('target_new', '')}" if "prompt" in n else ""
        lines.append(f"  nearest edit {n.get('id', n['index'])} (cosine {n['similarity']:.3f}) {what}".rstrip())
    return "\n".join(lines)


def _chat(args: argparse.Namespace) -> int:
    from meg.bundle import open_model
    from meg.chat import chat_loop

    _threads(args.threads)
    model = open_model(args.model)
    chat_loop(model, sys.stdin, sys.stdout, explain=args.explain, **_answer_options(args))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from meg.service import ServiceConfig, run_service

    cfg = ServiceConfig(host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                        max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_questions=args.max_questions,
                        max_chars=args.max_chars, max_tokens_per_question=args.max_tokens_per_question,
                        max_new_tokens=args.max_new_tokens, max_completion_tokens=args.max_completion_tokens,
                        model_name=args.model_name, api_key=args.api_key or os.environ.get("MEG_API_KEY") or None,
                        threads=args.threads, chat=False if args.raw else None, **_speed(args))
    run_service(args.model, cfg, base_only=args.base)
    return 0
