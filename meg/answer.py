"""Answering questions with an edited model: one batched pass, per-question neuron weights, explanations.

The CLI (``meg ask``, ``meg chat``), the HTTP service and the MLflow pyfunc model all answer through
``answer()``, so they give the same answers for the same questions.

One call:
1. routes every question and gives it its neuron weights (``EditedModel.weights_fn``: the router's
   routed rows get generated weights, the others none);
2. with ``explain``, adds a second copy of every *routed* question with the neuron switched off, so
   the base model's answer comes out of the same batched generate (an unrouted question's answer
   already *is* the base model's: zero weights leave the model bit-identical);
3. runs ONE left-padded greedy ``generate`` over all rows, the dynamic neuron applying each row's
   own weights at every position of prompt and continuation;
4. cuts every continuation at its first newline (generation stops once every row has one).

An answer is that first line, stripped: what the evaluation's AG protocol compares, before case
folding and the trailing '.' it drops.

Two speed options (``AnswerConfig.sample_steps``, ``weight_cache="edit"``) replace step 1's weights
by cheaper ones; they are off by default, and docs/serving.md reports their cost and effect.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from meg import neuron
from meg.errors import ConfigError

if TYPE_CHECKING:
    from meg.editor import EditedModel
    from meg.lm import LoadedModel


WEIGHT_CACHES = ("off", "edit")


@dataclass
class AnswerConfig:
    max_new_tokens: int = 20  # tokens generated at most per answer (the evaluation protocol's 20)
    stop_at_newline: bool = True  # stop a row at its first newline: the answer is the first line anyway
    top_k: int = 3  # nearest edits listed by an explanation
    # Speed options (off by default: the defaults answer exactly as MeG does; docs/serving.md has their cost
    # and measured effect on answers):
    sample_steps: int | None = None  # generator denoising steps per routed question (None: the bundle's)
    # "off": weights generated for every routed question from its own embedding (MeG); "edit": generated once
    # per edit from the edit prompt's embedding and reused for every question routed to that edit
    weight_cache: str = "off"

    def __post_init__(self) -> None:
        if self.sample_steps is not None and (not isinstance(self.sample_steps, int) or self.sample_steps < 1):
            raise ConfigError(f"answer: bad value for 'sample_steps': {self.sample_steps!r} (an integer >= 1 or null)")
        if self.weight_cache not in WEIGHT_CACHES:
            raise ConfigError(f"answer: bad value for 'weight_cache': {self.weight_cache!r} "
                              f"({' | '.join(WEIGHT_CACHES)})")

        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"answer: bad value for '{name}': {value!r} (an integer >= 1)")
        if not isinstance(self.stop_at_newline, bool):
            raise ConfigError(f"answer: bad value for 'stop_at_newline': {self.stop_at_newline!r} (true or false)")


_NEWLINE_IDS: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()


def newline_ids(tok) -> torch.Tensor:
    """Ids of every token whose text contains a newline (computed once per tokenizer, ~0.3 s)."""
    ids = _NEWLINE_IDS.get(tok)
    if ids is None:
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        ids = torch.tensor([i for i, t in enumerate(texts) if "\n" in t], dtype=torch.long)
        _NEWLINE_IDS[tok] = ids
    return ids


class NewlineStop(StoppingCriteria):
    """Per row: done once the last generated token holds a newline (transformers pads the row after)."""

    def __init__(self, tok):
        self.ids = newline_ids(tok)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.ids.to(input_ids.device))  # (B,) bool


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def generate_rows(
    loaded: "LoadedModel",
    prompts: list[str],
    weights: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    layer: int | None = None,
    act: str = "identity",
    max_new_tokens: int = 20,
    stop_at_newline: bool = False,
    min_new_tokens: int | None = None,
) -> list[list[int]]:
    """Greedy continuations (new token ids) of all prompts in one batched generate.

    ``weights`` (B, P) and ``active`` (B,) give row i its neuron at ``layer``; None runs the base model.
    ``min_new_tokens`` forces a length (benchmarks compare equal work).
    """
    tok, model = loaded.tokenizer, loaded.model
    if not prompts:
        return []
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)  # left-padded (lm.prepare_tokenizer)
    extra = {"stopping_criteria": StoppingCriteriaList([NewlineStop(tok)])} if stop_at_newline else {}
    if min_new_tokens:
        extra["min_new_tokens"] = min_new_tokens
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, **extra)
    if weights is None:
        gen = model.generate(**enc, **kwargs)
    else:
        with neuron.attached_neuron(model, layer, act) as mod:
            mod.set_weights(weights.to(model.device), None if active is None else active.to(model.device))
            gen = model.generate(**enc, **kwargs)
    new = gen[:, enc.input_ids.shape[1]:]  # (B, new)
    out = []
    for row in new.tolist():
        while row and row[-1] == tok.pad_token_id:
            row.pop()
        out.append(row)
    return out


def nearest_edits(model: "EditedModel", emb: torch.Tensor, k: int) -> list[list[dict]]:
    """The k edits nearest to each query embedding (cosine), with their text when the bundle has it."""
    router = model.router
    if router is None or getattr(router, "edit_emb", None) is None:
        return [[] for _ in range(emb.shape[0])]
    sims = F.normalize(emb.float().cpu(), dim=-1) @ router.edit_emb.T  # (M, N)
    top = sims.topk(min(k, sims.shape[1]), dim=1)
    table = model.info.get("edits") or []
    ids = model.info.get("edit_ids") or []
    out = []
    for values, index in zip(top.values.tolist(), top.indices.tolist()):
        row = []
        for s, i in zip(values, index):
            item = {"index": i, "similarity": round(s, 4)}
            if i < len(table):
                item.update({k2: table[i][k2] for k2 in ("id", "prompt", "target_new")})
            elif i < len(ids):
                item["id"] = ids[i]
            row.append(item)
        out.append(row)
    return out


_EDIT_WEIGHTS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def edit_weights(model: "EditedModel", steps: int | None = None) -> torch.Tensor:
    """(N, P) generator weights of every edit, from its prompt's embedding; computed once per model and steps.

    DDIM sampling starts every row from the same seeded noise, so an edit prompt asked as a question
    gets these very weights (up to rounding of batched products).
    """
    per_model = _EDIT_WEIGHTS.setdefault(model, {})
    if steps not in per_model:
        cond = model.edit_conditions()
        per_model[steps] = model.generator.sample(cond, steps=steps, seed=model.cfg.sample_seed)
    return per_model[steps]


def question_weights(model: "EditedModel", questions: list[str], cfg: AnswerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Neuron weights (n, P) and routed mask (n,): the model's own ``weights_fn`` unless a speed option is on."""
    uses_generator = model.generator is not None and model.cfg.weights == "generator" and model.router is not None
    if (cfg.sample_steps is None and cfg.weight_cache == "off") or not uses_generator:
        return model.weights_fn(questions)
    emb, mask, nearest, _, exact = model.route_exact(questions)
    w = torch.zeros(len(questions), model.w0.numel())
    rows = [r for r in mask.nonzero().flatten().tolist() if r not in exact]
    if rows:
        if cfg.weight_cache == "edit":
            w[rows] = edit_weights(model, cfg.sample_steps)[nearest[rows]]
        else:
            w[rows] = model.sample_weights([questions[i] for i in rows], emb[rows], cfg.sample_steps)
    if exact:
        fitted = sorted(exact)
        w[fitted] = model.lookup[nearest[fitted]]
    return w, mask


def answer_rows(model: "EditedModel", questions: list[str], explain: list[bool],
                cfg: AnswerConfig | None = None) -> tuple[list[str], list[dict | None]]:
    """Answers, and an explanation for every question whose ``explain`` flag is set (None for the others)."""
    cfg = cfg or AnswerConfig()
    n = len(questions)
    if len(explain) != n:
        raise ValueError(f"{n} questions but {len(explain)} explain flags")
    if n == 0:
        return [], []
    w, active = question_weights(model, questions, cfg)  # (n, P), (n,)
    # explained routed questions run a second time with the neuron off: the base model's answer
    base_rows = [i for i in range(n) if explain[i] and bool(active[i])]
    base_of = {i: n + j for j, i in enumerate(base_rows)}
    prompts = list(questions) + [questions[i] for i in base_rows]
    rows_w = torch.cat([w, torch.zeros(len(base_rows), w.shape[1], dtype=w.dtype)])
    rows_active = torch.cat([active, torch.zeros(len(base_rows), dtype=torch.bool)])
    ids = generate_rows(model.loaded, prompts, rows_w, rows_active, model.layer, model.act,
                        cfg.max_new_tokens, cfg.stop_at_newline)
    tok = model.loaded.tokenizer
    texts = [first_line(tok.decode(r, skip_special_tokens=True)) for r in ids]
    explanations: list[dict | None] = [None] * n
    asked = [i for i in range(n) if explain[i]]
    if asked:
        emb, r, exact = model.route_exact_detail([questions[i] for i in asked])
        near = nearest_edits(model, emb, cfg.top_k)
        for j, i in enumerate(asked):
            explanations[i] = {
                "question": questions[i],
                "routed": bool(r.mask[j]),
                "exact": j in exact,
                **model.why(r, j),
                "confidence": round(float(r.confidence[j]), 4),
                "nearest_edits": near[j],
                "answer": texts[i],
                "base_answer": texts[base_of[i]] if i in base_of else texts[i],
            }
    return texts[:n], explanations


def base_answer_rows(loaded: "LoadedModel", questions: list[str], explain: list[bool],
                     cfg: AnswerConfig | None = None) -> tuple[list[str], list[dict | None]]:
    """The same from the unedited model: the reference the benchmarks compare against."""
    cfg = cfg or AnswerConfig()
    ids = generate_rows(loaded, list(questions), max_new_tokens=cfg.max_new_tokens,
                        stop_at_newline=cfg.stop_at_newline)
    texts = [first_line(loaded.tokenizer.decode(r, skip_special_tokens=True)) for r in ids]
    explanations = [{"question": q, "routed": False, "exact": False, "confidence": 0.0, "nearest_edits": [],
                     "answer": t, "base_answer": t} if e else None for q, t, e in zip(questions, texts, explain)]
    return texts, explanations


def answer(model: "EditedModel", questions: list[str], explain: bool = False,
           cfg: AnswerConfig | None = None) -> dict:
    """{"answers": [str]} (+ "explanations": [dict] when ``explain``): the service's response body."""
    answers, explanations = answer_rows(model, list(questions), [explain] * len(questions), cfg)
    return {"answers": answers, **({"explanations": explanations} if explain else {})}


@torch.no_grad()
def generate_hf(model: "EditedModel", input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **generate_kwargs) -> torch.Tensor:
    """``transformers`` ``generate`` on token ids, every row routed on its own prompt text.

    Returns what transformers returns: (B * expand, T + new) ids, prompt included. Each row's prompt
    (its tokens under the attention mask) is decoded and routed; its neuron weights follow it when
    transformers expands the batch for beams or several return sequences.
    """
    loaded = model.loaded
    tok, lm_model = loaded.tokenizer, loaded.model
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompts = [tok.decode(row[mask.bool()], skip_special_tokens=True)
               for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]
    w, active = model.weights_fn(prompts)  # (B, P), (B,)
    expand = max(int(generate_kwargs.get("num_beams") or 1), int(generate_kwargs.get("num_return_sequences") or 1))
    if expand > 1:  # transformers repeats each row `expand` times in place (repeat_interleave)
        w, active = w.repeat_interleave(expand, 0), active.repeat_interleave(expand, 0)
    generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
    with neuron.attached_neuron(lm_model, model.layer, model.act) as mod:
        mod.set_weights(w.to(lm_model.device), active.to(lm_model.device))
        return lm_model.generate(input_ids=input_ids.to(lm_model.device),
                                 attention_mask=attention_mask.to(lm_model.device), **generate_kwargs)
