"""Re-running only the end of token rows: everything before a split point is computed once and kept
as a key/value cache.

MEMIT's z optimisation adds a vector at the subject's last token of every row and back-propagates
through the layers above L, step after step. Nothing before that token can change (attention is
causal), yet it is most of each row: the context prefix and the start of the prompt. So each row is
split at its lookup token: the *head* (tokens before it) runs once through the whole model and
leaves its keys and values in a cache; each step runs only the *tail* (the lookup token onwards)
through layers L+1.., attending to the cached head. This gives the same logits as the full rows
(tested), and each step's work grows with the tail's length instead of the row's.

Layout: heads are left-padded to a common width P and tails right-padded to a width A, so every
tail starts at column P and real tokens are contiguous (as in batched generation); position ids
count real tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meg import fit, lm, textbatch


@dataclass
class SplitRows:
    head_ids: torch.Tensor  # (R, P) left-padded
    head_mask: torch.Tensor  # (R, P)
    tail_ids: torch.Tensor  # (R, A) right-padded; column 0 is the split token
    tail_mask: torch.Tensor  # (R, A)

    @property
    def mask(self) -> torch.Tensor:  # (R, P + A)
        return torch.cat([self.head_mask, self.tail_mask], dim=1)

    @property
    def tail_positions(self) -> torch.Tensor:  # (R, A)
        return textbatch.position_ids(self.mask)[:, self.head_ids.shape[1] :]


def split_rows(seqs: list[list[int]], splits: list[int], pad: int) -> SplitRows:
    """Rows of token ids, each cut before its ``splits[r]``-th token."""
    width_p = max(splits)
    width_a = max(len(s) - c for s, c in zip(seqs, splits))
    head = torch.full((len(seqs), width_p), pad, dtype=torch.long)
    head_mask = torch.zeros_like(head)
    tail = torch.full((len(seqs), width_a), pad, dtype=torch.long)
    tail_mask = torch.zeros_like(tail)
    for r, (s, c) in enumerate(zip(seqs, splits)):
        if c:
            head[r, width_p - c :] = torch.tensor(s[:c])
            head_mask[r, width_p - c :] = 1
        tail[r, : len(s) - c] = torch.tensor(s[c:])
        tail_mask[r, : len(s) - c] = 1
    return SplitRows(head, head_mask, tail, tail_mask)


class _Stop(Exception):
    pass


class HeadCache:
    """The heads' keys and values at every layer, restorable after each tail pass."""

    def __init__(self, model: nn.Module, rows: SplitRows):
        from transformers import DynamicCache

        device = next(model.parameters()).device
        rows = SplitRows(*(getattr(rows, f).to(device) for f in ("head_ids", "head_mask", "tail_ids", "tail_mask")))
        self.model, self.rows = model, rows
        self.cache = None
        self._snapshot: list[dict] = []
        if rows.head_ids.shape[1] == 0:
            return
        self.cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model.base_model(input_ids=rows.head_ids, attention_mask=rows.head_mask,
                             position_ids=textbatch.position_ids(rows.head_mask), past_key_values=self.cache,
                             use_cache=True)
        for layer in self.cache.layers:
            # a head of pads only (lookup at the first token) attends to nothing: keep it finite
            layer.keys, layer.values = layer.keys.nan_to_num(), layer.values.nan_to_num()
            self._snapshot.append(dict(vars(layer)))

    def for_rows(self, rows: torch.Tensor | None):
        """The cache as it was after the heads, for a subset of rows (None = all)."""
        if self.cache is None:
            return None
        for layer, snap in zip(self.cache.layers, self._snapshot):
            layer.__dict__.update(snap)  # cache updates rebind tensors, so the snapshot is intact
            if rows is not None:
                layer.keys, layer.values = snap["keys"][rows], snap["values"][rows]
        return self.cache

    def _tail(self, rows: torch.Tensor | None):
        r = self.rows
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        return dict(input_ids=sel(r.tail_ids), attention_mask=sel(r.mask), position_ids=sel(r.tail_positions),
                    past_key_values=self.for_rows(rows), use_cache=self.cache is not None)

    @torch.no_grad()
    def block_output(self, layer: int) -> torch.Tensor:
        """(R, A, D) residual leaving block ``layer`` at the tail tokens."""
        got = {}

        def hook(module, args, kwargs, output):
            got["h"] = (output[0] if isinstance(output, tuple) else output).detach()
            raise _Stop

        handle = lm.decoder_layers(self.model)[layer].register_forward_hook(hook, with_kwargs=True)
        try:
            self.model.base_model(**self._tail(None))
        except _Stop:
            pass
        finally:
            handle.remove()
        return got["h"]

    def tail_hidden(self, layer: int, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (R', A, D) of the tails when block ``layer``'s input is ``h``."""
        holder = {"h": h}
        with fit.replay_from(self.model, layer, holder):
            return self.model.base_model(**self._tail(rows)).last_hidden_state


def logits_of(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits (with the family's soft-cap) of hidden states (N, D) -> (N, V)."""
    logits = model.get_output_embeddings()(hidden)
    cap = lm.final_softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()
