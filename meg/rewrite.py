"""Rewordings of a fact's question, written by a language model (by default the edited model itself).

A neuron fitted on one wording of a question often stays silent on another. Fitting it on several
wordings at once carries it to wordings it never saw, but those wordings must come from somewhere
that is not the evaluation: a benchmark's own paraphrase templates (CounterFact states each
relation with the same few hundred templates in every split) would make generality a memory test.
Here the model writes them: a few-shot prompt of our own examples asks it to restate the opening of
a question ("The mother tongue of X is") in other words, it samples several candidates, and a
filter keeps the ones that are still open questions about the same subject and mean the same under
a sentence encoder.

Rewording is done per relation template where the subject is known: the edits that share a
template ("The mother tongue of {} is") share one model call, made with the first edit's subject;
each candidate turns back into a template and is filled with every other edit's subject. A prompt
without a usable subject is rewritten on its own.

Candidates are cached per model content hash, settings and prompt under ``$MEG_HOME/rewrites``, so
a second build, or a build with more facts, samples only what is new. The package ships the candidates
of the benchmarks' templates for its offline model at the default settings (``PACKAGED``, written by
``python -m bench.stores rewrites``): sampling is seeded, so they are what a fresh machine would sample,
and a first build starts without the half hour they cost on two cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
import gzip
from pathlib import Path
from typing import Callable, Iterable

import torch

from meg import lm
from meg.errors import ConfigError
from meg.probes import Blocklist, norm_text, template_of

# Our own examples: a question or statement opening, and the same question in other words. None of them is a
# benchmark's wording; the subjects are well known so that the model is not distracted by an odd name.
FEW_SHOT = (
    ("The capital city of Kenya is", "Kenya has its seat of government in the city of"),
    ("Marie Curie was awarded a prize in", "The field in which Marie Curie won an award is"),
    ("What sport does Lionel Messi play?", "Lionel Messi is a professional player of the sport of"),
    ("The headquarters of Toyota are in", "Which city is home to the head office of Toyota?"),
    ("Who composed the opera Carmen?", "The composer who wrote the opera Carmen is"),
    ("Mount Fuji is located in the country of", "In which country can you find Mount Fuji?"),
)
TOP_K = 50  # tokens sampled from at most (then the top_p nucleus of them)
INSTRUCTION = ("Rewrite each opening in other words, keeping the same person or thing and leaving the same "
               "answer missing.\n\n")

# Model-free rewordings (``RewriteConfig.source`` "frames"): the prompt inside a few fixed frames. They teach
# no relation wording; they exist for tests on random models and as a floor where no model writes well.
FRAMES = ("Question: {}", "Tell me this: {}", "Quick one. {}")


@dataclass(frozen=True)
class RewriteConfig:
    source: str = "model"  # "model": the base model writes rewordings; "frames": FRAMES only (no model call)
    n_samples: int = 12  # candidates sampled per prompt
    max_new_tokens: int = 24
    temperature: float = 0.6
    top_p: float = 0.95
    # cosine (base sentence encoder, subject masked) a kept rewording needs. On 128 held-out pseudo-edits fitted on
    # 4 rewordings with the margin stop, 0.3 kept 2.1 per edit and carried the neuron to 85.2% of the never-fitted
    # paraphrases; 0.5 kept 1.5 (79.7%) (docs/experiments/rewordings.md)
    min_similarity: float = 0.3
    seed: int = 0
    batch_size: int = 8  # prompts per generate call (times n_samples sequences)

    def __post_init__(self) -> None:
        checks = {
            "source": self.source in ("model", "frames"),
            "n_samples": self.n_samples >= 1, "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature > 0, "top_p": 0 < self.top_p <= 1,
            "min_similarity": -1 <= self.min_similarity <= 1, "batch_size": self.batch_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"rewrite: bad value for '{name}': {getattr(self, name)!r}")

    def key(self, model_hash: str) -> str:
        blob = json.dumps({"model": model_hash, "shots": FEW_SHOT, "instruction": INSTRUCTION,
                           **{k: v for k, v in asdict(self).items() if k not in ("batch_size", "min_similarity")}},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def few_shot_prompt(question: str) -> str:
    shots = "".join(f"Opening: {a}\nRewritten: {b}\n\n" for a, b in FEW_SHOT)
    return f"{INSTRUCTION}{shots}Opening: {question}\nRewritten:"


PACKAGED = Path(__file__).parent / "assets" / "rewrites"  # shipped candidates: <settings key>.jsonl.gz


def read_candidates(path: Path) -> dict[str, list[str]]:
    """prompt -> candidates from a cache file (JSON lines, gzip when the name ends in .gz); lines cut short by an
    interruption are skipped (their prompts are sampled again)."""
    opener = gzip.open if path.suffix == ".gz" else open
    out: dict[str, list[str]] = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                out[row["prompt"]] = list(row["candidates"])
            except (ValueError, KeyError, TypeError):
                continue
    return out


class Rewriter:
    """Samples rewordings of prompts with a causal LM; caches raw candidates on disk per prompt."""

    def __init__(self, loaded: lm.LoadedModel, cfg: RewriteConfig | None = None, cache_dir: Path | None = None,
                 progress: bool = False):
        self.loaded, self.cfg, self.progress = loaded, cfg or RewriteConfig(), progress
        root = Path(cache_dir) if cache_dir is not None else lm.meg_home() / "rewrites"
        self.cache_file = root / f"{self.cfg.key(loaded.content_hash)}.jsonl"
        self._cache: dict[str, list[str]] | None = None

    def _load(self) -> dict[str, list[str]]:
        if self._cache is None:
            self._cache = {}
            packaged = PACKAGED / f"{self.cache_file.stem}.jsonl.gz"
            if packaged.is_file():
                self._cache.update(read_candidates(packaged))
            if self.cache_file.is_file():
                self._cache.update(read_candidates(self.cache_file))
        return self._cache

    def candidates(self, prompts: Iterable[str]) -> dict[str, list[str]]:
        """Raw sampled rewordings (first lines, stripped, distinct) of each prompt."""
        prompts = list(dict.fromkeys(prompts))
        if self.cfg.source == "frames":
            return {p: [f.format(p) for f in FRAMES] for p in prompts}
        cache = self._load()
        todo = [p for p in prompts if p not in cache]
        if todo:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            bar = None
            if self.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(todo), desc="rewrite", unit="prompt", mininterval=5.0)
            with open(self.cache_file, "a", encoding="utf-8") as f:
                for start in range(0, len(todo), self.cfg.batch_size):
                    chunk = todo[start : start + self.cfg.batch_size]
                    for p, cands in zip(chunk, self._sample(chunk)):
                        cache[p] = cands
                        f.write(json.dumps({"prompt": p, "candidates": cands}, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    if bar:
                        bar.update(len(chunk))
            if bar:
                bar.close()
        return {p: cache[p] for p in prompts}

    @torch.no_grad()
    def _sample(self, prompts: list[str]) -> list[list[str]]:
        """``n_samples`` sampled first lines per prompt: one prefill per prompt, its cache repeated per sample."""
        from transformers import DynamicCache

        tok, model, cfg = self.loaded.tokenizer, self.loaded.model, self.cfg
        side, pad = tok.padding_side, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        tok.padding_side = "left"
        try:
            enc = tok([few_shot_prompt(p) for p in prompts], return_tensors="pt", padding=True).to(model.device)
        finally:
            tok.padding_side = side
        # one seed per batch, from the prompts themselves: the same prompts give the same candidates
        seed = int(hashlib.sha256(("\n".join(prompts) + str(cfg.seed)).encode()).hexdigest()[:8], 16)
        g = torch.Generator(device="cpu").manual_seed(seed)
        mask = enc.attention_mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = model(input_ids=enc.input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True)
        k = cfg.n_samples
        cache.batch_repeat_interleave(k)
        logits = out.logits[:, -1].repeat_interleave(k, dim=0)  # (B*k, V)
        mask = mask.repeat_interleave(k, dim=0)
        last = pos[:, -1].repeat_interleave(k, dim=0)
        newline = self._newline_ids()
        rows = logits.shape[0]
        tokens = torch.full((rows, cfg.max_new_tokens), pad, dtype=torch.long)
        done = torch.zeros(rows, dtype=torch.bool)
        for step in range(cfg.max_new_tokens):
            top = logits.float().topk(TOP_K, dim=-1)  # sorted; the nucleus lies within the top TOP_K
            sorted_p = torch.softmax(top.values / cfg.temperature, dim=-1)
            cut = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest set reaching top_p
            sorted_p[cut] = 0.0
            pick = top.indices.gather(1, torch.multinomial(sorted_p.cpu(), 1, generator=g).to(logits.device)).squeeze(1)
            pick[done] = pad
            tokens[:, step] = pick.cpu()
            done |= torch.isin(pick.cpu(), newline)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last = last + 1
            out = model(input_ids=pick[:, None], attention_mask=mask, position_ids=last[:, None],
                        past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
        texts = [tok.decode(row, skip_special_tokens=True) for row in tokens]
        result = []
        for i in range(len(prompts)):
            lines = [t.split("\n", 1)[0].strip() for t in texts[i * k : (i + 1) * k]]
            result.append(list(dict.fromkeys(x for x in lines if x)))
        return result

    def _newline_ids(self) -> torch.Tensor:
        if not hasattr(self, "_nl"):
            tok = self.loaded.tokenizer
            self._nl = torch.tensor([i for t, i in tok.get_vocab().items() if "\n" in tok.convert_tokens_to_string([t])]
                                    + ([tok.eos_token_id] if tok.eos_token_id is not None else []))
        return self._nl


def _masked(template: str) -> str:
    return template.replace("{}", "it", 1)


def _states_answer(text: str, answers: Iterable[str]) -> bool:
    low = text.casefold()
    return any(re.search(r"(?<!\w)" + re.escape(a.casefold()) + r"(?!\w)", low) for a in answers if a and a.strip())


class Rewordings:
    """Rewordings of a build's prompts (edits and pseudo-edits), per relation template, filtered once.

    ``prepare`` samples every template not sampled yet in one go (the rewriter caches them on disk);
    ``of`` then gives up to ``n`` rewordings of one prompt, most similar to it first. A kept rewording
    names the subject, is not the prompt, is no full sentence (no final '.' or '!'), states none of the
    answers, is not blocked (``Blocklist.blocks_rewording``: no probe text, no probe paraphrase's template),
    and has a cosine of at least ``min_similarity`` to the prompt under ``encode`` with the subject masked.
    """

    def __init__(self, rewriter: Rewriter, blocklist: Blocklist, encode: Callable[[list[str]], torch.Tensor],
                 min_similarity: float | None = None, canonical: Iterable[tuple[str, str | None, tuple[str, ...]]] = ()):
        self.rewriter, self.blocklist, self.encode = rewriter, blocklist, encode
        self.min_similarity = rewriter.cfg.min_similarity if min_similarity is None else min_similarity
        self._ranked: dict[str, list[str]] = {}  # key -> templates ("{}" for the subject) or texts, best first
        # the item each template is rewritten with, chosen among a fixed population (the pseudo-edit pool), so
        # that a template's rewordings do not depend on which edits or pool slice a build asks about first
        self._canonical = _representatives(canonical)

    @staticmethod
    def key(prompt: str, subject: str | None) -> str:
        t = template_of(prompt, subject)
        return "T:" + t if t is not None else "P:" + prompt

    def prepare(self, items: Iterable[tuple[str, str | None, tuple[str, ...]]]) -> None:
        """Sample and rank the rewordings of ``(prompt, subject, answers)`` items whose key is new.

        A template is rewritten once, with the subject of the item whose subject hashes lowest (so the choice
        does not depend on the order or number of items), and its answers kept out."""
        reps = _representatives(x for x in items if self.key(x[0], x[1]) not in self._ranked)
        reps = {k: self._canonical.get(k, item) for k, item in reps.items()}
        if not reps:
            return
        found = self.rewriter.candidates(p for p, _, _ in reps.values())
        for k, (prompt, subject, answers) in reps.items():
            self._ranked[k] = self._rank(prompt, subject, answers, found[prompt])

    def _rank(self, prompt: str, subject: str | None, answers: tuple[str, ...], candidates: list[str]) -> list[str]:
        own_t = template_of(prompt, subject)
        own = own_t if own_t is not None else prompt
        seen, keep = {norm_text(own)}, []
        for c in candidates:
            if len(c) > 2 * len(prompt) + 40 or c.rstrip().endswith((".", "!")) or _states_answer(c, answers):
                continue
            if self.blocklist.blocks_rewording(c, subject):
                continue
            item = c
            if own_t is not None:
                item = template_of(c, subject)
                if item is None:  # the subject is not named (or named in an odd way): no rewording of this fact
                    continue
            if norm_text(item) in seen:
                continue
            seen.add(norm_text(item))
            keep.append(item)
        if not keep:
            return []
        masked = [_masked(x) for x in [own, *keep]] if own_t is not None else [own, *keep]
        emb = torch.nn.functional.normalize(self.encode(masked).float(), dim=-1)
        sims = (emb[1:] @ emb[0]).tolist()
        ranked = sorted(range(len(keep)), key=lambda i: (-sims[i], i))
        return [keep[i] for i in ranked if sims[i] >= self.min_similarity]

    def of(self, prompt: str, subject: str | None, n: int, answers: Iterable[str] = ()) -> list[str]:
        """Up to ``n`` rewordings of ``prompt`` (``prepare`` must have seen its key)."""
        k = self.key(prompt, subject)
        if k not in self._ranked:
            self.prepare([(prompt, subject, tuple(answers))])
        out, own = [], norm_text(prompt)
        for item in self._ranked[k]:
            text = item.replace("{}", subject, 1) if k.startswith("T:") else item
            if norm_text(text) == own or self.blocklist.text_blocked(text) or _states_answer(text, answers):
                continue
            out.append(text)
            if len(out) == n:
                break
        return out


def _subject_rank(subject: str | None) -> str:
    return hashlib.sha256((subject or "").encode("utf-8")).hexdigest()


def _representatives(items: Iterable[tuple[str, str | None, tuple[str, ...]]]) -> dict:
    """Per key (``Rewordings.key``), the item whose subject hashes lowest: the one its template is rewritten with."""
    reps: dict[str, tuple[str, str | None, tuple[str, ...]]] = {}
    for prompt, subject, answers in items:
        k = Rewordings.key(prompt, subject)
        old = reps.get(k)
        if old is None or _subject_rank(subject) < _subject_rank(old[1]):
            reps[k] = (prompt, subject, tuple(answers))
    return reps
