"""Held-out pseudo-edits as a fact file, for choosing between MeG settings without the evaluated edits.

    python -m bench.devset --n 1000 --out dev.jsonl
    python -m bench.quality --facts dev.jsonl --n-edits 1000 --methods meg \\
        --variant meg-lookup:weights=lookup --work-dir W --out dev-choice.json

The records are the last N of the pseudo-edit pool (``meg.editor.pseudo_pool``: CounterFact *train*
records sharing nothing with any benchmark edit). The encoder trains on the pool's first
``n_pseudo_encoder`` records and the router calibrates on the next ``n_pseudo_calibration``; the
tail is used by neither. Editing a tail record removes it from the pool, and also every record that
shares a text with it, so tail records sharing a prompt or paraphrase with the head are skipped: the
head stays as it was, and a build on this file trains the encoder and calibrates the router on the very
pseudo-edit records a benchmark build uses (checked here); their rewordings can differ where a dev record's
paraphrase template, which that build evaluates, is blocked. Each record has its own prompt, one
paraphrase and one locality prompt, like CounterFact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meg.editor import MegConfig, pseudo_pool
from meg.errors import ConfigError


def held_out(n: int, cfg: MegConfig | None = None) -> list:
    """The last ``n`` pseudo-edits; refuses when they would reach into the encoder's or router's share."""
    cfg = cfg or MegConfig()
    pool = pseudo_pool([])
    used = cfg.n_pseudo_encoder + cfg.n_pseudo_calibration
    if n < 1 or n > len(pool) - used:  # an upper bound; records sharing texts with the head are skipped
        raise ConfigError(f"devset: --n must be 1-{len(pool) - used} (the pool has {len(pool)} pseudo-edits, "
                          f"{used} of them train the encoder or calibrate the router), got {n}")
    head = pool[:used]
    taken = {t for e in head for t in (e.prompt, *e.paraphrases[:1], *(q.prompt for q in e.locality[:1]))}
    # a tail record whose prompt or paraphrase a head record also uses would push that record out; a dev record
    # is asked like a CounterFact one, so it needs its locality prompt
    free = [e for e in pool[used:] if e.locality and not ({e.prompt, *e.paraphrases} & taken)]
    if n > len(free):
        raise ConfigError(f"devset: only {len(free)} pseudo-edits are free of the encoder's and router's texts, "
                          f"asked for {n}")
    dev = free[-n:]
    after = pseudo_pool(dev)
    if [e.content_key for e in after[:used]] != [e.content_key for e in pool[:used]]:
        raise ConfigError("devset: editing these records would change the encoder's or router's pseudo-edits")
    return dev


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="how many pseudo-edits")
    ap.add_argument("--out", required=True, help="the fact file to write (JSON lines)")
    args = ap.parse_args(argv)
    try:
        dev = held_out(args.n)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for e in dev:
            f.write(json.dumps(e.to_dict(), ensure_ascii=False) + "\n")
    print(f"{len(dev)} held-out pseudo-edits ({dev[0].id} .. {dev[-1].id}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
