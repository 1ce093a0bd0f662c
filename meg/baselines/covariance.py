"""Key statistics C0 = E[k k^T] per edited layer, computed once per model and cached.

k is the input of a layer's FFN output projection at one token (MEMIT's "key"), taken over every
token of the local corpus (``meg.baselines.corpus``) except special tokens: a BOS token's
activations are outliers far larger than any key an edit reads, and no edit ever reads one.

One pass over the corpus computes every missing layer at once, running the model only up to the
deepest of them. The running sums are checkpointed (atomically) every ``checkpoint_every``
batches, so an interrupted pass resumes where it stopped. Results live in
``$MEG_HOME/stats/<model-hash>/mom2-<corpus-key>/layer-<l>.safetensors`` with the token count.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from meg import lm
from meg.baselines import locate
from meg.baselines.corpus import CorpusConfig, corpus_rows, stats_root

TOKENS_PER_BATCH = 4096  # corpus tokens per forward pass (rows are packed up to this)


def _dir(loaded: lm.LoadedModel, cfg: CorpusConfig) -> Path:
    return stats_root(loaded) / f"mom2-{cfg.key()}"


def _save(tensors: dict[str, torch.Tensor], path: Path, meta: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two editors may compute the same statistics at once
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def _batches(rows: list[list[int]]) -> list[list[int]]:
    """Row indices grouped by similar length into batches of about TOKENS_PER_BATCH tokens."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches, cur, width = [], [], 0
    for i in order:
        width = max(width, len(rows[i]))
        if cur and width * (len(cur) + 1) > TOKENS_PER_BATCH:
            batches.append(cur)
            cur, width = [], len(rows[i])
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _compute(loaded: lm.LoadedModel, layers: list[int], cfg: CorpusConfig, checkpoint_every: int,
             progress: bool) -> None:
    out_dir = _dir(loaded, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok, model = loaded.tokenizer, loaded.model
    rows = corpus_rows(loaded, cfg, progress)
    batches = _batches(rows)
    partial = out_dir / f"partial-{'-'.join(map(str, layers))}.safetensors"
    inner = lm.out_proj_weight(model, layers[0]).shape[1]
    sums = {l: torch.zeros(inner, inner, dtype=torch.float64) for l in layers}
    count, start, seconds = 0, 0, 0.0
    if partial.is_file():
        state = load_file(partial)
        sums = {l: state[f"sum{l}"] for l in layers}
        count, start, seconds = int(state["count"]), int(state["next"]), float(state["seconds"])
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.time() - seconds
    bar = tqdm(total=len(batches), initial=start, desc=f"key statistics L{layers}", unit="batch",
               disable=not progress)
    for b in range(start, len(batches)):
        ids, mask = _pad([rows[i] for i in batches[b]], pad)
        keep = mask.bool() & ~torch.isin(ids, special)  # (B, T) real, non-special tokens
        acts = locate.capture(model, ids.to(model.device), mask.to(model.device), [("key", l) for l in layers])
        for l in layers:
            k = acts[("key", l)][keep.to(model.device)].float().cpu()  # (n, I)
            sums[l] += (k.T @ k).double()
        count += int(keep.sum())
        bar.update(1)
        if (b + 1) % checkpoint_every == 0 and b + 1 < len(batches):
            _save({**{f"sum{l}": s for l, s in sums.items()}, "count": torch.tensor(count),
                   "next": torch.tensor(b + 1), "seconds": torch.tensor(time.time() - t0)}, partial, {})
    bar.close()
    meta = {"tokens": count, "texts": len(rows), "seconds": time.time() - t0, "corpus": cfg.key(),
            "model": loaded.content_hash}
    for l in layers:
        _save({"mom2": (sums[l] / max(count, 1)).float(), "count": torch.tensor(count)},
              out_dir / f"layer-{l}.safetensors", {**meta, "layer": l})
    partial.unlink(missing_ok=True)


def second_moments(loaded: lm.LoadedModel, layers: list[int], cfg: CorpusConfig | None = None,
                   checkpoint_every: int = 50, progress: bool = True) -> dict[int, torch.Tensor]:
    """E[k k^T] (I, I) of each layer's keys over the corpus; computed where not cached."""
    cfg = cfg or CorpusConfig()
    out_dir = _dir(loaded, cfg)
    missing = sorted({l for l in layers if not (out_dir / f"layer-{l}.safetensors").is_file()})
    if missing:
        _compute(loaded, missing, cfg, checkpoint_every, progress)
    return {l: load_file(out_dir / f"layer-{l}.safetensors")["mom2"] for l in layers}


def stats_info(loaded: lm.LoadedModel, layer: int, cfg: CorpusConfig | None = None) -> dict:
    """What a cached statistic was computed from: tokens, texts, seconds."""
    from safetensors import safe_open

    path = _dir(loaded, cfg or CorpusConfig()) / f"layer-{layer}.safetensors"
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])
