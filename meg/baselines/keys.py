"""Keys k^l and current residuals h^L of a list of edits, in batches (MEMIT's compute_ks / cur_zs).

A key is read at the edit's lookup position with every context template: MEMIT averages the
bare prompt's key with the mean of the prefixed ones (each template *type* weighs the same).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from meg import lm
from meg.baselines import locate

if TYPE_CHECKING:
    from meg.facts import EditRequest

ROWS_PER_BATCH = 128


def _rows(tok, edits: "list[EditRequest]", prefix: str) -> tuple[list[str], list[str | None], list[int]]:
    texts = [locate.with_prefix(prefix, e.prompt) for e in edits]
    starts = [len(prefix) + 1 if prefix else 0] * len(edits)
    return texts, [e.subject for e in edits], starts


@torch.no_grad()
def _at_lookup(loaded: lm.LoadedModel, texts, subjects, starts, wanted: list[tuple[str, int]], desc: str,
               progress: bool) -> list[torch.Tensor]:
    """(N, width) activation per (kind, layer) of ``wanted`` (``locate.capture``) at each row's lookup token."""
    tok, model = loaded.tokenizer, loaded.model
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor | None] = [None] * len(wanted)
    for s in tqdm(range(0, len(order), ROWS_PER_BATCH), desc=desc, unit="batch", disable=not progress,
                  leave=False):
        idx = order[s : s + ROWS_PER_BATCH]
        rows = locate.encode_rows(tok, [texts[i] for i in idx], [subjects[i] for i in idx], [starts[i] for i in idx])
        # tokens after the lookup token cannot change what is read there (causal attention): drop them
        width = int(rows.lookup.max()) + 1
        mask = rows.attention_mask[:, :width] * (torch.arange(width)[None, :] <= rows.lookup[:, None])
        acts = locate.capture(model, rows.input_ids[:, :width].to(model.device), mask.to(model.device), wanted)
        for j, w in enumerate(wanted):
            vals = locate.at_lookup(acts[w], rows.lookup.to(model.device)).float().cpu()
            if out[j] is None:
                out[j] = torch.empty(len(texts), vals.shape[1])
            out[j][idx] = vals
    return out


def edit_keys(loaded: lm.LoadedModel, edits: "list[EditRequest]", layer: int, prefixes: list[str],
              progress: bool = True) -> torch.Tensor:
    """(N, I) keys at ``layer``: mean of the bare prompt's key and the prefixed keys' mean."""
    tok = loaded.tokenizer
    per_prefix = [_at_lookup(loaded, *_rows(tok, edits, p), [("key", layer)], f"keys L{layer} ({j + 1}/{len(prefixes)})",
                             progress)[0] for j, p in enumerate(prefixes)]
    bare = [k for p, k in zip(prefixes, per_prefix) if not p]
    rest = [k for p, k in zip(prefixes, per_prefix) if p]
    groups = [torch.stack(g).mean(0) for g in (bare, rest) if g]
    return torch.stack(groups).mean(0)


def edit_hidden(loaded: lm.LoadedModel, edits: "list[EditRequest]", layer: int, progress: bool = True) -> torch.Tensor:
    """(N, D) residual leaving block ``layer`` at each bare prompt's lookup position."""
    return _at_lookup(loaded, *_rows(loaded.tokenizer, edits, ""), [("hidden", layer)], f"h at L{layer}", progress)[0]


def edit_hidden_and_ffn_out(loaded: lm.LoadedModel, edits: "list[EditRequest]", layer: int, ffn_layer: int,
                            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``edit_hidden`` at ``layer`` and, from the same pass, (N, D) the output of the FFN output projection
    of ``ffn_layer`` (before any post-FFN norm) at the same positions."""
    h, m = _at_lookup(loaded, *_rows(loaded.tokenizer, edits, ""), [("hidden", layer), ("ffn_out", ffn_layer)],
                      f"h at L{layer}", progress)
    return h, m
