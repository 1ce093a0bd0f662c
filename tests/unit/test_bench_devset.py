"""bench.devset: held-out pseudo-edits that leave the encoder's and the router's pseudo-edits unchanged."""

import pytest


def test_held_out_edits_leave_the_encoder_and_router_sets_alone(tmp_path):
    from bench.devset import main
    from meg.editor import MegConfig, pseudo_pool
    from meg.facts import read_facts

    out = tmp_path / "dev.jsonl"
    assert main(["--n", "40", "--out", str(out)]) == 0
    dev = read_facts(out)
    assert len(dev) == 40 and len({e.content_key for e in dev}) == 40
    cfg = MegConfig()
    used = cfg.n_pseudo_encoder + cfg.n_pseudo_calibration
    before, after = pseudo_pool([]), pseudo_pool(dev)
    head = {e.content_key for e in before[:used]}
    assert not head & {e.content_key for e in dev}
    # the encoder trains on, and the router calibrates with, exactly what a benchmark build uses
    assert [e.content_key for e in after[:used]] == [e.content_key for e in before[:used]]
    texts = {t for e in before[:used] for t in (e.prompt, e.paraphrases[0], *(q.prompt for q in e.locality))}
    assert not texts & {t for e in dev for t in (e.prompt, *e.paraphrases)}
    assert all(e.paraphrases and e.locality for e in dev)


@pytest.mark.parametrize("n", [0, 100_000])
def test_impossible_sizes_are_refused(tmp_path, capsys, n):
    from bench.devset import main

    assert main(["--n", str(n), "--out", str(tmp_path / "dev.jsonl")]) == 2
    assert "--n must be" in capsys.readouterr().err
    assert not (tmp_path / "dev.jsonl").exists()
