"""Where an edit lives inside the model: its lookup token, its context rows, activations there.

Notation (MEMIT paper -> code), shared by MEMIT, AlphaEdit and GRACE:

    s        the edit's subject; its last token in the prompt is the *lookup position*
    k^l      key at layer l: the input of the FFN output projection at the lookup position, (I,)
    h^L      the residual stream leaving decoder block L at the lookup position, (D,)

A missing subject (user facts may have none) or one that does not occur in the prompt falls back
to the prompt's last token, which is where GRACE reads its key anyway.

Rows are right-padded: real tokens never see a pad, so their activations do not depend on which
other rows share the batch.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from meg import lm, textbatch

log = logging.getLogger(__name__)


def with_prefix(prefix: str, prompt: str) -> str:
    """A prompt behind a context prefix (MEMIT's "{prefix}. {prompt}" templates)."""
    return f"{prefix} {prompt}" if prefix else prompt


def subject_tokens(tok, text: str, subject: str | None, search_from: int = 0) -> list[int]:
    """Indices, in ``tok(text)`` (special tokens included), of the tokens covering the subject.

    The subject is searched in ``text[search_from:]``, exact case first, then case-insensitive;
    an empty list when it is missing or not found.
    """
    if not subject:
        return []
    start = text.find(subject, search_from)
    if start < 0:
        start = text.casefold().find(subject.casefold(), search_from)
    if start < 0:
        log.warning("subject %r not found in %r: using its last token", subject, text)
        return []
    end = start + len(subject)
    offsets = tok(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def lookup_index(tok, text: str, subject: str | None, search_from: int = 0) -> int:
    """Index, in ``tok(text)``, of the subject's last token; the text's last token without one."""
    inside = subject_tokens(tok, text, subject, search_from)
    return inside[-1] if inside else len(tok(text, add_special_tokens=True).input_ids) - 1


@dataclass
class Rows:
    """Right-padded token rows with one lookup position each."""

    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T)
    lookup: torch.Tensor  # (R,) column of the lookup token


def encode_rows(tok, texts: list[str], subjects: list[str | None], starts: list[int] | None = None) -> Rows:
    """Tokenise texts (special tokens included) and find each one's lookup position."""
    starts = starts or [0] * len(texts)
    ids = [tok(t, add_special_tokens=True).input_ids for t in texts]
    width = max(len(i) for i in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, row in enumerate(ids):
        out[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    lookup = torch.tensor([lookup_index(tok, t, s, f) for t, s, f in zip(texts, subjects, starts)])
    return Rows(out, mask, lookup)


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            wanted: list[tuple[str, int]]) -> dict[tuple[str, int], torch.Tensor]:
    """Activations of one forward pass, which stops after the deepest layer wanted.

    ``wanted`` holds (kind, layer) pairs: "key" = input of the FFN output projection (B, T, I),
    "ffn_out" = its output (B, T, D), before any post-FFN norm, "ffn_in" = input of the FFN
    (B, T, D), "hidden" = output of the decoder block (B, T, D).
    """
    layers = lm.decoder_layers(model)
    got: dict[tuple[str, int], torch.Tensor] = {}
    deepest = max(layer for _, layer in wanted)

    def first_arg(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def pre(kind, layer):
        return lambda m, args, kwargs: got.__setitem__((kind, layer), first_arg(args, kwargs).detach())

    def post(kind, layer):
        def hook(m, args, kwargs, output):
            got[(kind, layer)] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    def stop(m, args, kwargs, output):
        raise _Stop

    with ExitStack() as stack:
        for kind, layer in wanted:
            if kind == "key":
                h = lm.ffn_out_proj(model, layer).register_forward_pre_hook(pre(kind, layer), with_kwargs=True)
            elif kind == "ffn_out":
                h = lm.ffn_out_proj(model, layer).register_forward_hook(post(kind, layer), with_kwargs=True)
            elif kind == "ffn_in":
                h = lm.ffn_module(model, layer).register_forward_pre_hook(pre(kind, layer), with_kwargs=True)
            elif kind == "hidden":
                h = layers[layer].register_forward_hook(post(kind, layer), with_kwargs=True)
            else:
                raise ValueError(f"unknown activation kind {kind!r}")
            stack.callback(h.remove)
        h = layers[deepest].register_forward_hook(stop, with_kwargs=True)
        stack.callback(h.remove)
        try:
            model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=textbatch.position_ids(attention_mask), use_cache=False)
        except _Stop:
            pass
    return got


def at_lookup(acts: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """(R, T, X) activations -> (R, X) at each row's lookup column."""
    return acts[torch.arange(acts.shape[0]), lookup]
