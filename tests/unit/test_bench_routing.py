"""bench.routing: the shares it reports from the router's decisions, and its settings parser."""

import pytest
import torch

from bench.routing import parse_settings, summary
from meg.errors import ConfigError
from meg.facts import EditRequest
from meg.router import RELATION, ROUTED, THRESHOLD, Routing


def routing(mask: list[bool], nearest: list[int], reason: list[str]) -> Routing:
    n = len(mask)
    return Routing(torch.tensor(mask), torch.tensor(nearest), torch.ones(n), reason, torch.full((n,), float("nan")))


def test_summary_counts_own_edit_routes_and_questions_after_context_apart():
    edits = [
        EditRequest(id="a", prompt="A speaks", target_new="x", subject="Ann", paraphrases=("Ann's language is",)),
        EditRequest(id="b", prompt="B speaks", target_new="y", subject="Bob", paraphrases=("It rained. Bob talks",)),
        EditRequest(id="c", prompt="C speaks", target_new="z", subject="Cy", paraphrases=("Cy's tongue is",)),
        EditRequest(id="d", prompt="D speaks", target_new="w", subject="Dee", paraphrases=("Dee talks",)),
    ]
    para = routing([True, True, False, True], [0, 1, 2, 0], [ROUTED, ROUTED, RELATION, ROUTED])
    loc = routing([False, True], [0, 3], [THRESHOLD, ROUTED])
    s = summary(edits, para, loc, 2)
    assert s["paraphrase_routed_own"] == 0.5  # a and b; d went to a's edit
    assert s["paraphrase_routed_other"] == 0.25
    assert s["n_after_context"] == 1 and s["after_context_routed_own"] == 1.0
    assert s["plain_routed_own"] == pytest.approx(1 / 3)
    assert s["missed_because"] == {RELATION: 1, ROUTED: 1}
    assert s["locality_routed"] == 0.5


def test_settings_are_json_values_or_words():
    assert parse_settings(["router_options.question_view=0.5", "pseudo_context=false", "router=nearest"]) == {
        "router_options.question_view": 0.5, "pseudo_context": False, "router": "nearest"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_settings(["question_view"])
