"""The local text corpus behind the key statistics E[k k^T] of MEMIT and AlphaEdit.

MEMIT estimates the keys of "everything the model already knows" from 100k Wikipedia samples;
no such corpus can be fetched here, so the corpus is made offline from two sources:

1. **Text the base model writes itself**: ``n_sampled`` (320) continuations of ``sample_tokens`` tokens,
   sampled (top-p 0.95, temperature 1, fixed seeds) from two kinds of openings in turn: a subject
   from the CounterFact *train* split (the model writes about an entity, as an encyclopaedia
   would) and a short generic opening ("In 1990,", "The company", ...). Text drawn from the
   model's own distribution is, by construction, text whose keys the model produces in use.
2. **Facts as stated in the CounterFact train split**: for each of ``n_train_records`` records,
   the prompt completed with its *true* object, the paraphrase, and the locality prompt completed
   with its answer: short factual statements of the very shape the edits have.

Never the evaluated edit split; and the last 1,000 train records stay out of the corpus, so the
pseudo-edits that hyperparameters are tuned on (``bench/tune_baselines.py``) are not among the
"preserved" facts either. Sampled texts are stored per batch (atomically) under
``$MEG_HOME/stats/<model-hash>/sampled-<key>/``, so an interrupted run resumes and every layer's
statistics are computed from the same text.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from meg import lm
from meg.errors import ConfigError

OPENINGS = (
    "In 1990,", "The company", "According to the report,", "She was born in", "The city of",
    "During the war,", "The album", "Scientists have found that", "He studied at", "The river",
    "In the early years,", "The team", "The language", "The museum", "After the election,",
    "The book", "The species", "The film", "The university", "Many people believe that",
)


@dataclass
class CorpusConfig:
    n_sampled: int = 320  # texts the base model writes itself
    sample_tokens: int = 128  # new tokens per sampled text
    n_train_records: int = 3000  # first CounterFact train records whose statements join the corpus
    batch_size: int = 64  # texts sampled per generate() call (one stored part each)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_sampled", "n_train_records"):
            if getattr(self, name) < 0:
                raise ConfigError(f"corpus: bad value for '{name}': {getattr(self, name)!r}")
        for name in ("sample_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"corpus: bad value for '{name}': {getattr(self, name)!r}")
        if self.n_sampled + self.n_train_records == 0:
            raise ConfigError("corpus: 'n_sampled' and 'n_train_records' are both 0: the corpus would be empty")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def sampling_key(self) -> str:
        """Identifies the sampled parts: part p is the same whatever ``n_sampled`` and the statements."""
        blob = json.dumps([self.sample_tokens, self.batch_size, self.seed])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stats_root(loaded: lm.LoadedModel) -> Path:
    return lm.meg_home() / "stats" / loaded.content_hash[:16]


def train_statements(n: int) -> list[str]:
    """True statements from the CounterFact train split: prompt + old target, paraphrase, locality."""
    from meg.facts import load_benchmark

    texts: list[str] = []
    for e in load_benchmark("counterfact", "train")[:n]:
        if e.target_old:
            texts.append(f"{e.prompt} {e.target_old}.")
        texts.extend(e.paraphrases[:1])
        for p in e.locality[:1]:
            texts.append(f"{p.prompt} {p.answer}." if p.answer else p.prompt)
    return texts


def _openings(n: int) -> list[str]:
    """The i-th text's opening, the same whatever ``n``."""
    from meg.facts import load_benchmark

    subjects = [e.subject for e in load_benchmark("counterfact", "train") if e.subject]
    return [subjects[(i // 2) % len(subjects)] if i % 2 == 0 else OPENINGS[(i // 2) % len(OPENINGS)]
            for i in range(n)]


@torch.no_grad()
def _sample_part(loaded: lm.LoadedModel, starts: list[str], cfg: CorpusConfig, seed: int) -> list[list[int]]:
    tok, model = loaded.tokenizer, loaded.model
    enc = tok(starts, return_tensors="pt", padding=True).to(model.device)  # left-padded
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, top_p=0.95, temperature=1.0, top_k=0,
                         max_new_tokens=cfg.sample_tokens, pad_token_id=tok.pad_token_id)
    rows = []
    width = enc.input_ids.shape[1]
    for r in range(out.shape[0]):
        ids = out[r, width - int(enc.attention_mask[r].sum()) :].tolist()  # drop the left padding
        while ids and ids[-1] == tok.pad_token_id:  # and what pads a text that ended early
            ids.pop()
        rows.append(ids)
    return rows


def sampled_texts(loaded: lm.LoadedModel, cfg: CorpusConfig, progress: bool = True) -> list[list[int]]:
    """Token ids of the model-written texts, sampled once per model and configuration."""
    root = stats_root(loaded) / f"sampled-{cfg.sampling_key()}"
    root.mkdir(parents=True, exist_ok=True)
    n_parts = (cfg.n_sampled + cfg.batch_size - 1) // cfg.batch_size
    starts = _openings(n_parts * cfg.batch_size)  # whole parts, so a part never depends on n_sampled
    rows: list[list[int]] = []
    bar = tqdm(range(n_parts), desc="corpus: sampling", unit="part", disable=not progress)
    for p in bar:
        path = root / f"sampled-{p:05d}.safetensors"
        if not path.is_file():
            part = _sample_part(loaded, starts[p * cfg.batch_size : (p + 1) * cfg.batch_size], cfg, cfg.seed * 100_003 + p)
            flat = torch.tensor([t for r in part for t in r], dtype=torch.long)
            lengths = torch.tensor([len(r) for r in part], dtype=torch.long)
            tmp = path.with_suffix(".tmp")
            save_file({"ids": flat, "lengths": lengths}, str(tmp))
            os.replace(tmp, path)
        stored = load_file(path)
        rows.extend(r.tolist() for r in torch.split(stored["ids"], stored["lengths"].tolist()))
    return rows[: cfg.n_sampled]


def corpus_rows(loaded: lm.LoadedModel, cfg: CorpusConfig, progress: bool = True) -> list[list[int]]:
    """Every corpus text as token ids (special tokens the tokenizer adds included)."""
    tok = loaded.tokenizer
    rows = sampled_texts(loaded, cfg, progress) if cfg.n_sampled else []
    rows += [tok(t, add_special_tokens=True).input_ids for t in train_statements(cfg.n_train_records)]
    return rows
