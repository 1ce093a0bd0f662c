"""Answering questions with an edited model: one batched pass, per-question neuron weights, explanations.

The CLI (``meg ask``, ``meg chat``), the HTTP service and the MLflow pyfunc model all answer through
``answer()``, so they give the same answers for the same questions.

One call:
1. routes every question and gives it its neuron weights (``EditedModel.weights_fn``: the model's weight
   source, ``meg.sources``, gives the routed rows theirs, the others get none);
2. with ``explain``, adds a second copy of every *routed* question with the neuron switched off, so
   the base model's answer comes out of the same batched generate (an unrouted question's answer
   already *is* the base model's: zero weights leave the model bit-identical);
3. runs ONE left-padded greedy ``generate`` over all rows (``meg.generation``, the path the evaluation
   uses too), the dynamic neuron applying each row's own weights at every position of prompt and
   continuation;
4. completion (``chat`` off): cuts every continuation at its first newline (generation stops once every
   row has one). Chat (the default when the base model has a chat template): each question is a user
   turn of the chat template, routed on the question alone, answered to the end of the turn, and a
   routed row's neuron is switched off once its answer states the routed edit's target.

A completion answer is that first line, stripped: what the evaluation's AG protocol compares, before
case folding and the trailing '.' it drops; a chat answer is the assistant's turn, stripped. A question
may also be a list of chat messages (``{"role", "content"}``): it is routed on its last user message.

``answer_detail`` is the same pass with per-question token limits and stop texts (the OpenAI-compatible
endpoints of the service), returning per question the tokens generated, why the answer ended ("stop" or
"length") and whether it was routed; ``raw_text`` keeps a completion's continuation whole (not cut at its
first line).

Two speed options (``AnswerConfig.sample_steps``, ``weight_cache="edit"``) replace step 1's generated
weights by cheaper ones (a source that generates nothing ignores them); they are off by default, and
docs/serving.md reports their cost and effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from meg import generation, neuron
from meg.errors import ConfigError

if TYPE_CHECKING:
    from meg.editor import EditedModel
    from meg.lm import LoadedModel


WEIGHT_CACHES = ("off", "edit")


@dataclass
class AnswerConfig:
    max_new_tokens: int | None = None  # tokens generated at most per answer (None: 20 completing, 40 in chat)
    stop_at_newline: bool = True  # completion: stop a row at its first newline (the answer is the first line)
    # ask each question as a user turn of the base model's chat template (None: when the tokenizer has one)
    chat: bool | None = None
    # switch a routed row's neuron off once its answer states the routed edit's target (None: in chat)
    release: bool | None = None
    top_k: int = 3  # nearest edits listed by an explanation
    # the continuation as decoded, not cut at its first line nor stripped (an OpenAI-style completion)
    raw_text: bool = False
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
            if value is None and name == "max_new_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"answer: bad value for '{name}': {value!r} (an integer >= 1)")
        for name in ("stop_at_newline", "chat", "release", "raw_text"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name not in ("stop_at_newline", "raw_text")):
                raise ConfigError(f"answer: bad value for '{name}': {value!r} (true or false)")

    def resolved(self, tok) -> "AnswerConfig":
        """This config with ``chat``, ``release`` and ``max_new_tokens`` decided for a tokenizer."""
        from dataclasses import replace

        chat = generation.has_chat_template(tok) if self.chat is None else self.chat
        if chat and not generation.has_chat_template(tok):
            raise ConfigError("answer: 'chat' is on but the base model's tokenizer has no chat template")
        return replace(self, chat=chat, release=chat if self.release is None else self.release,
                       max_new_tokens=self.max_new_tokens or (generation.CHAT_MAX_NEW_TOKENS if chat else 20))


newline_ids = generation.newline_ids
NewlineStop = generation.NewlineStop


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def route_text(question) -> str:
    """What a question is routed on: itself, or a chat's last user message."""
    return question if isinstance(question, str) else generation.last_user_turn(question)


def render(tok, question, chat: bool) -> str:
    """The model's input for a question: the text itself (completion) or its chat-template rendering."""
    if chat:
        return generation.chat_prompt(tok, question)
    if not isinstance(question, str):
        raise ConfigError("answer: a list of chat messages needs chat on")
    return question


generate_rows = generation.generate_ids  # the one generation path (meg.generation)


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


def edit_weights(model: "EditedModel", steps: int | None = None) -> torch.Tensor:
    """(N, P) generated weights of every edit, from its prompt's condition; computed once per model and steps
    (``meg.sources.DiffusionSource.edit_weights``)."""
    return model.source.edit_weights(steps)


def question_weights(model: "EditedModel", questions: list[str], cfg: AnswerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Neuron weights (n, P) and routed mask (n,): the model's own ``weights_fn`` unless a speed option is on,
    else the weight source's with that option. Without a router no edit is known per question, and the options
    are ignored."""
    if (cfg.sample_steps is None and cfg.weight_cache == "off") or model.router is None:
        return model.weights_fn(questions)
    batch = model.route_batch(questions)
    return model.source.weights(batch, cfg.sample_steps, cfg.weight_cache == "edit"), batch.mask


def _finish(tok, ids: list[int], cfg: AnswerConfig, limit: int, stop: tuple[str, ...]) -> tuple[str, dict]:
    """A row's answer text and its details: ``completion_tokens`` (generated, a final end-of-sequence token
    not counted) and ``finish_reason`` ("stop": a stop text, the end of the turn or of the line; "length": the
    token limit). The text is cut before the first of the ``stop`` texts it holds."""
    text = tok.decode(ids, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    ended = bool(ids) and ids[-1] == tok.eos_token_id
    n_tokens = len(ids) - ended
    line_ended = cfg.stop_at_newline and not cfg.chat and "\n" in text
    reason = "stop" if cut >= 0 or ended or line_ended or len(ids) < limit else "length"
    if not cfg.raw_text:
        text = text.strip() if cfg.chat else first_line(text)
    return text, {"completion_tokens": n_tokens, "finish_reason": reason}


def _row_limits(cfg: AnswerConfig, n: int, max_new_tokens: list[int | None] | None,
                stop: list[tuple[str, ...]] | None) -> tuple[list[int], list[tuple[str, ...]]]:
    limits = [m or cfg.max_new_tokens for m in (max_new_tokens or [None] * n)]
    stops = [tuple(s or ()) for s in (stop or [()] * n)]
    if len(limits) != n or len(stops) != n:
        raise ValueError(f"{n} questions but {len(limits)} length limits and {len(stops)} stop lists")
    return limits, stops


def _stop_decided(stops: list[tuple[str, ...]]):
    """A ``decided`` rule ending a row once its continuation holds one of its stop texts (None: no stop texts)."""
    if not any(stops):
        return None
    return lambda text, row: any(s in text for s in stops[row])


def answer_rows(model: "EditedModel", questions: list, explain: list[bool],
                cfg: AnswerConfig | None = None) -> tuple[list[str], list[dict | None]]:
    """Answers, and an explanation for every question whose ``explain`` flag is set (None for the others).

    A question is a string, or (chat) a list of messages routed on its last user message."""
    return answer_detail(model, questions, explain, cfg)[:2]


def answer_detail(model: "EditedModel", questions: list, explain: list[bool], cfg: AnswerConfig | None = None,
                  max_new_tokens: list[int | None] | None = None, stop: list[tuple[str, ...]] | None = None
                  ) -> tuple[list[str], list[dict | None], list[dict]]:
    """``answer_rows`` with per-question limits, and details per question.

    ``max_new_tokens[i]`` (None: the config's) and ``stop[i]`` (texts that end the answer, not included in it)
    apply to question i alone. The details: ``routed`` (the question got the edited knowledge),
    ``completion_tokens`` and ``finish_reason`` (see ``_finish``)."""
    tok = model.loaded.tokenizer
    cfg = (cfg or AnswerConfig()).resolved(tok)
    n = len(questions)
    if len(explain) != n:
        raise ValueError(f"{n} questions but {len(explain)} explain flags")
    if n == 0:
        return [], [], []
    limits, stops = _row_limits(cfg, n, max_new_tokens, stop)
    routed_on = [route_text(q) for q in questions]
    w, active = question_weights(model, routed_on, cfg)  # (n, P), (n,)
    release = model.release_texts(routed_on) if cfg.release else None
    # explained routed questions run a second time with the neuron off: the base model's answer
    base_rows = [i for i in range(n) if explain[i] and bool(active[i])]
    base_of = {i: n + j for j, i in enumerate(base_rows)}
    rendered = [render(tok, q, cfg.chat) for q in questions]
    prompts = rendered + [rendered[i] for i in base_rows]
    rows_w = torch.cat([w, torch.zeros(len(base_rows), w.shape[1], dtype=w.dtype)])
    rows_active = torch.cat([active, torch.zeros(len(base_rows), dtype=torch.bool)])
    if release is not None:
        release = list(release) + [None] * len(base_rows)
    row_limits, row_stops = limits + [limits[i] for i in base_rows], stops + [stops[i] for i in base_rows]
    ids = generate_rows(model.loaded, prompts, rows_w, rows_active, model.layer, model.act, cfg.max_new_tokens,
                        cfg.stop_at_newline and not cfg.chat, decided=_stop_decided(row_stops), release=release,
                        add_special_tokens=not cfg.chat,
                        row_max_new_tokens=None if max_new_tokens is None else row_limits)
    finished = [_finish(tok, r, cfg, lim, st) for r, lim, st in zip(ids, row_limits, row_stops)]
    texts = [t for t, _ in finished]
    details = [{"routed": bool(active[i]), **finished[i][1]} for i in range(n)]
    explanations: list[dict | None] = [None] * n
    asked = [i for i in range(n) if explain[i]]
    if asked:
        emb, r, exact = model.route_exact_detail([routed_on[i] for i in asked])
        near = nearest_edits(model, emb, cfg.top_k)
        for j, i in enumerate(asked):
            explanations[i] = {
                "question": routed_on[i],
                "routed": bool(r.mask[j]),
                "exact": j in exact,
                **model.why(r, j),
                "confidence": round(float(r.confidence[j]), 4),
                "nearest_edits": near[j],
                "answer": texts[i],
                "base_answer": texts[base_of[i]] if i in base_of else texts[i],
            }
    return texts[:n], explanations, details


def base_answer_rows(loaded: "LoadedModel", questions: list, explain: list[bool],
                     cfg: AnswerConfig | None = None) -> tuple[list[str], list[dict | None]]:
    """The same from the unedited model: the reference the benchmarks compare against."""
    return base_answer_detail(loaded, questions, explain, cfg)[:2]


def base_answer_detail(loaded: "LoadedModel", questions: list, explain: list[bool], cfg: AnswerConfig | None = None,
                       max_new_tokens: list[int | None] | None = None, stop: list[tuple[str, ...]] | None = None
                       ) -> tuple[list[str], list[dict | None], list[dict]]:
    """``answer_detail`` for the unedited model (nothing is routed)."""
    tok = loaded.tokenizer
    cfg = (cfg or AnswerConfig()).resolved(tok)
    if not questions:
        return [], [], []
    limits, stops = _row_limits(cfg, len(questions), max_new_tokens, stop)
    rendered = [render(tok, q, cfg.chat) for q in questions]
    ids = generate_rows(loaded, rendered, max_new_tokens=cfg.max_new_tokens,
                        stop_at_newline=cfg.stop_at_newline and not cfg.chat, decided=_stop_decided(stops),
                        add_special_tokens=not cfg.chat, row_max_new_tokens=None if max_new_tokens is None else limits)
    finished = [_finish(tok, r, cfg, lim, st) for r, lim, st in zip(ids, limits, stops)]
    texts = [t for t, _ in finished]
    explanations = [{"question": route_text(q), "routed": False, "exact": False, "confidence": 0.0,
                     "nearest_edits": [], "answer": t, "base_answer": t} if e else None
                    for q, t, e in zip(questions, texts, explain)]
    return texts, explanations, [{"routed": False, **d} for _, d in finished]


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
