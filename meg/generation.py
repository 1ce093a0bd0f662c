"""The one generation path: evaluation, the CLI, the service and the pyfunc model all decode through here.

``generate_ids`` runs one left-padded greedy ``generate`` over a batch of rendered prompts, the dynamic
neuron giving each row its own weights at every position. Stop rules, all per row:

- ``stop_at_newline``: the first line is the answer (completion use, the AG protocol);
- the tokenizer's end-of-sequence token always ends a row (a chat model's end of turn);
- ``expected``: the AG outcome is decided (``meg.evaluate.answer_decided``), so more tokens change nothing;
- ``release``: once a row's continuation states its text (the routed edit's target, as a whole word), the
  neuron is switched off for that row; the model then ends its answer as it would. The neuron acts on
  every position it is on, so left on after the answer it keeps pushing the target ("English English
  English ...") in contexts it was not fitted in, such as a chat turn.

Chat use: ``chat_prompt`` renders a question as a user turn of the model's chat template (with the
generation prompt of the assistant turn). Routing always sees the question, never the template around it.
"""

from __future__ import annotations

import re
import weakref
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from meg import neuron

CHAT_MAX_NEW_TOKENS = 40  # the chat protocol's answer length (docs/metrics.md)

_NEWLINE_IDS: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()


def newline_ids(tok) -> torch.Tensor:
    """Ids of every token whose text contains a newline (computed once per tokenizer, ~0.3 s)."""
    ids = _NEWLINE_IDS.get(tok)
    if ids is None:
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        ids = torch.tensor([i for i, t in enumerate(texts) if "\n" in t], dtype=torch.long)
        _NEWLINE_IDS[tok] = ids
    return ids


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def chat_prompt(tok, question: str | list[dict]) -> str:
    """A question (or a list of chat messages) as the model's chat template renders it, ready for the answer."""
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


_TURN_END: "weakref.WeakKeyDictionary[object, list[int]]" = weakref.WeakKeyDictionary()


def turn_end_ids(tok) -> list[int]:
    """The token(s) that end an assistant turn in the chat template (SmolLM2: <|im_end|>): what the template
    writes right after an answer, up to its first newline; the end-of-sequence token when it writes nothing."""
    found = _TURN_END.get(tok)
    if found is None:
        marker = "ANSWERMARK"
        text = tok.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": marker}],
                                       tokenize=False)
        after = text[text.index(marker) + len(marker):].split("\n", 1)[0]
        found = tok(after, add_special_tokens=False).input_ids if after.strip() else []
        found = found or [tok.eos_token_id]
        _TURN_END[tok] = found
    return found


def last_user_turn(messages: list[dict]) -> str:
    """The text a chat is routed on: its last user message."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    raise ValueError("a chat needs at least one user message")


def states(text: str, target: str) -> bool:
    """Whether ``text`` states ``target``: the target, case-folded, as a whole word or phrase."""
    t = " ".join(target.casefold().split())
    if not t:
        return False
    return re.search(r"(?<!\w)" + re.escape(t) + r"(?!\w)", " ".join(text.casefold().split())) is not None


class NewlineStop(StoppingCriteria):
    """Per row: done once the last generated token holds a newline (transformers pads the row after)."""

    def __init__(self, tok):
        self.ids = newline_ids(tok)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.ids.to(input_ids.device))  # (B,) bool


class _Decided(StoppingCriteria):
    """Per row: done once ``decided(text so far, row)`` (text = the decoded continuation)."""

    def __init__(self, tok, prompt_len: int, decided: Callable[[str, int], bool]):
        self.tok, self.prompt_len, self.decided = tok, prompt_len, decided
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        new = input_ids[:, self.prompt_len :]
        for row in (~self.done).nonzero().flatten().tolist():
            self.done[row] = self.decided(self.tok.decode(new[row], skip_special_tokens=True), row)
        return self.done.to(input_ids.device).clone()


class _RowLength(StoppingCriteria):
    """Per row: done once the row has ``limits[row]`` new tokens (rows of one batch asking for different lengths)."""

    def __init__(self, prompt_len: int, limits: list[int]):
        self.prompt_len, self.limits = prompt_len, torch.tensor(limits, dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_len >= self.limits).to(input_ids.device)


def stated_and_closed(text: str, target: str) -> bool:
    """``states``, and some character, a space or line break included, follows the text's end of the target, so
    the word is finished ("English" at the very end may still become "Englishman")."""
    return states(text, target) and not text.casefold().endswith(target.strip().casefold())


class _Release(StoppingCriteria):
    """Never stops a row; switches a row's neuron off once its continuation states the row's release text and
    the stated word is finished (``stated_and_closed``)."""

    def __init__(self, tok, prompt_len: int, mod: "neuron.DynamicNeuron", weights: torch.Tensor,
                 active: torch.Tensor, release: list[str | None]):
        self.tok, self.prompt_len, self.mod = tok, prompt_len, mod
        self.weights, self.active, self.release = weights, active.clone(), release

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :]
        changed = False
        for row in self.active.nonzero().flatten().tolist():
            target = self.release[row]
            if target and stated_and_closed(self.tok.decode(new[row], skip_special_tokens=True), target):
                self.active[row] = False
                changed = True
        if changed:
            self.mod.set_weights(self.weights, self.active.to(self.weights.device))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_ids(
    loaded,
    prompts: list[str],
    weights: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    layer: int | None = None,
    act: str = "identity",
    max_new_tokens: int = 20,
    stop_at_newline: bool = False,
    decided: Callable[[str, int], bool] | None = None,
    release: list[str | None] | None = None,
    add_special_tokens: bool = True,
    min_new_tokens: int | None = None,
    row_max_new_tokens: list[int] | None = None,
) -> list[list[int]]:
    """Greedy continuations (new token ids, trailing padding removed) of ``prompts``, one batched generate.

    ``weights`` (B, P) and ``active`` (B,) give row i its neuron at ``layer`` (None: the model as it is).
    ``decided(text, row)`` ends a row early once more tokens cannot change what is measured; ``release``
    gives per row a text after which its neuron is off. ``add_special_tokens`` is False for prompts that
    already hold them (a rendered chat template). ``min_new_tokens`` forces a length (benchmarks).
    ``row_max_new_tokens`` gives each row its own length limit (the batch runs to the largest of them and
    ``max_new_tokens`` is ignored): a row's tokens do not depend on how long the other rows run.
    """
    tok, model = loaded.tokenizer, loaded.model
    if not prompts:
        return []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(model.device)
    finally:
        tok.padding_side = side
    width = enc.input_ids.shape[1]
    stops: list[StoppingCriteria] = []
    if stop_at_newline:
        stops.append(NewlineStop(tok))
    if decided is not None:
        stops.append(_Decided(tok, width, decided))
    if row_max_new_tokens is not None:
        if len(row_max_new_tokens) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(row_max_new_tokens)} length limits")
        max_new_tokens = max(row_max_new_tokens)
        if min(row_max_new_tokens) < max_new_tokens:
            stops.append(_RowLength(width, row_max_new_tokens))
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if weights is None:
        gen = model.generate(**enc, stopping_criteria=StoppingCriteriaList(stops), **kwargs)
    else:
        if active is None:
            active = weights.abs().sum(dim=1) > 0
        w, a = weights.to(model.device), active.to(model.device)
        with neuron.attached_neuron(model, layer, act) as mod:
            mod.set_weights(w, a)
            if release is not None and any(release):
                stops.append(_Release(tok, width, mod, w, a, release))
            gen = model.generate(**enc, stopping_criteria=StoppingCriteriaList(stops), **kwargs)
    out = []
    for row in gen[:, width:].tolist():
        while row and row[-1] == tok.pad_token_id:
            row.pop()
        out.append(row)
    return out
