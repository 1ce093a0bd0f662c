"""Tokenised prompt + target batches, shared by fitting and teacher-forced scoring.

A row is ``prompt tokens + target tokens``; the model reads all but the last token and is scored
at the positions that predict each target token. Prompts are tokenised with the tokenizer's
special tokens (a BOS where the model wants one), targets without, as ``" " + target``, so
`" Paris"` stays one token for SmolLM2. Rows are right-padded: pads come after every scored
position, so neither the causal attention nor the position ids of real tokens depend on the pad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def target_text(target: str) -> str:
    target = target.strip()
    return " " + target


@dataclass
class TargetBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (N,) row of each scored position
    cols: torch.Tensor  # (N,) column whose logits predict the token
    labels: torch.Tensor  # (N,) the token to predict
    owner: torch.Tensor  # (N,) index (into the batch rows) of the row each position belongs to
    n_target: torch.Tensor  # (B,) number of scored positions per row

    def to(self, device: torch.device | str) -> "TargetBatch":
        return TargetBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def encode(tok, prompts: list[str], targets: list[str], suffix: str = "") -> TargetBatch:
    """Encode rows ``prompt + " " + target + suffix``; the suffix (e.g. a newline) is scored too."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    return encode_ids(tok, prompts, [target_ids(tok, t, suffix) for t in targets])


def target_ids(tok, target: str, suffix: str = "") -> list[int]:
    """The token ids a row scores for ``target``: ``" " + target``, then the suffix."""
    suffix_ids = tok(suffix, add_special_tokens=False).input_ids if suffix else []
    return tok(target_text(target), add_special_tokens=False).input_ids + suffix_ids


def encode_ids(tok, prompts: list[str], target_ids: list[list[int]], add_special_tokens: bool = True) -> TargetBatch:
    """Encode rows of a prompt followed by given target token ids (``add_special_tokens`` False for prompts that
    hold them already, such as a rendered chat template)."""
    seqs, spans = [], []
    for prompt, t in zip(prompts, target_ids):
        p = tok(prompt, add_special_tokens=add_special_tokens).input_ids
        if not p or not t:
            raise ValueError(f"empty tokenisation for prompt {prompt!r} or its target")
        seqs.append(p + list(t))
        spans.append((len(p), len(t)))
    width = max(len(s) for s in seqs) - 1
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, labels = [], [], []
    for i, (seq, (n_p, n_t)) in enumerate(zip(seqs, spans)):
        inp = seq[:-1]
        ids[i, : len(inp)] = torch.tensor(inp)
        mask[i, : len(inp)] = 1
        rows.extend([i] * n_t)
        cols.extend(range(n_p - 1, n_p - 1 + n_t))
        labels.extend(seq[n_p:])
    rows_t = torch.tensor(rows)
    return TargetBatch(
        input_ids=ids,
        attention_mask=mask,
        rows=rows_t,
        cols=torch.tensor(cols),
        labels=torch.tensor(labels),
        owner=rows_t.clone(),
        n_target=torch.tensor([n_t for _, n_t in spans]),
    )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens (correct for left and right padding)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def per_row_mean(values: torch.Tensor, owner: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of per-position values within each row: (N,) -> (B,)."""
    total = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, owner, values)
    count = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(
        0, owner, torch.ones_like(values)
    )
    return total / count.clamp(min=1)


def per_row_all(flags: torch.Tensor, owner: torch.Tensor, n_rows: int) -> torch.Tensor:
    """True for a row when every one of its positions is True: (N,) -> (B,)."""
    bad = torch.zeros(n_rows, dtype=torch.long, device=flags.device).index_add(0, owner, (~flags).long())
    return bad == 0


def hidden_at(model: torch.nn.Module, batch: TargetBatch) -> torch.Tensor:
    """The final hidden states at the scored positions, (N, D): what the LM head reads."""
    out = model.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state[batch.rows, batch.cols]


def head_logits(model: torch.nn.Module, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits of hidden states (N, D), over the whole vocabulary or over the token ids ``vocab``
    (then column j is token ``vocab[j]``), with the model's final soft-cap if it has one."""
    from meg import lm

    head = model.get_output_embeddings()
    if vocab is None:
        logits = head(hidden)
    else:
        logits = hidden @ head.weight.index_select(0, vocab).T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias.index_select(0, vocab)
    cap = lm.final_softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def logits_at(model: torch.nn.Module, batch: TargetBatch) -> torch.Tensor:
    """Logits at the scored positions only, (N, V): the LM head never sees the other positions."""
    return head_logits(model, hidden_at(model, batch))
