"""A Python API that users of EasyEdit recognise.

    from meg.api import MegEditorAPI
    from meg.editor import MegConfig

    editor = MegEditorAPI.from_pretrained(model="smollm2-135m", config=MegConfig())
    metrics, edited_model = editor.edit(
        prompts=["The mother tongue of Danielle Darrieux is"],
        target_new=["English"],
        ground_truth=["French"],
        rephrase_prompts=["Where Danielle Darrieux is from, people speak the language of"],
        locality_inputs={"neighborhood": {"prompt": ["Michel Rocard is a native speaker of"],
                                          "ground_truth": ["French"]}},
        subject=["Danielle Darrieux"],
    )
    edited_model.generate(input_ids=..., attention_mask=..., max_new_tokens=20)   # like transformers
    edited_model.save("bundle/");  EditedModel.load("bundle/")

``metrics`` is a list with one dict per edit of this call, in the order of ``prompts``::

    {
      "case_id": 0,                       # position in this call
      "requested_rewrite": {"id", "prompt", "target_new", "ground_truth", "subject", "rephrase_prompt",
                            "locality": {NAME: {"prompt", "ground_truth"}}},
      "time": 12.3,                       # seconds of the whole edit call (all edits are edited together)
      "pre":  {"rewrite_acc": [a], "rewrite_ag": [g], "rephrase_acc": [a], "rephrase_ag": [g],
               "locality": {"NAME_output": "the base model's answer"}},
      "post": {"rewrite_acc": [a], "rewrite_ag": [g], "rephrase_acc": [a], "rephrase_ag": [g],
               "locality": {"NAME_acc": [a], "NAME_ag": [g]}, "routed": true}
    }

``*_acc`` is teacher-forced token accuracy of the new target (0-1, EasyEdit's measure), ``*_ag`` is
1.0 when greedy generation gives exactly the target (meg.evaluate's AG protocol), else 0.0.
Locality follows meg.evaluate too: the label is the *pre-edit* model's own greedy answer to the
locality prompt (a given ``ground_truth`` is kept in ``requested_rewrite`` but not scored), so
``NAME_acc`` asks "did the answer stay the same". ``rephrase_*`` appear only for edits with a
rephrase prompt, ``locality`` entries only for the names given. ``routed`` says whether the router
sent the edit prompt to the edited knowledge.

``keep_original_weight`` follows EasyEdit's meaning: True (default) edits the base model with this
call's facts only; False edits sequentially: this call's facts are added to those of earlier calls
with False, and the returned model holds all of them (fitted weights are reused from the work
directory, so only new facts are fitted). MeG never changes the base model's weights in either case.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from meg.errors import ConfigError

if TYPE_CHECKING:
    from meg.editor import EditedModel, MegConfig
    from meg.facts import EditRequest
    from meg.lm import LoadedModel


def _as_list(name: str, value, n: int, required: bool = False) -> list | None:
    """One value per prompt: a string is one edit's value; None stays None unless required."""
    if value is None:
        if required:
            raise ConfigError(f"edit: '{name}' is required")
        return None
    values = [value] if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ConfigError(f"edit: '{name}' has {len(values)} entries, but there are {n} prompts")
    return values


def _locality_sets(locality_inputs: dict | None, n: int) -> dict[str, tuple[list[str], list | None]]:
    """{NAME: (prompts, ground truths or None)} from EasyEdit's locality_inputs."""
    out: dict[str, tuple[list[str], list | None]] = {}
    for name, spec in (locality_inputs or {}).items():
        if not isinstance(spec, dict) or "prompt" not in spec:
            raise ConfigError(f"edit: locality_inputs['{name}'] must be a dict with 'prompt' (and 'ground_truth')")
        prompts = _as_list(f"locality_inputs['{name}']['prompt']", spec["prompt"], n, required=True)
        truths = _as_list(f"locality_inputs['{name}']['ground_truth']", spec.get("ground_truth"), n)
        out[name] = (prompts, truths)
    return out


class MegEditorAPI:
    """EasyEdit's ``BaseEditor`` shape over MeG: ``from_pretrained`` once, then ``edit`` as often as needed."""

    def __init__(self, loaded: "LoadedModel", config: "MegConfig | None" = None,
                 work_dir: str | Path | None = None, progress: bool = True):
        from meg.editor import MegConfig

        self.loaded, self.config = loaded, config or MegConfig()
        self.work_dir = Path(work_dir) if work_dir else None
        self.progress = progress
        self.history: list["EditRequest"] = []  # facts of earlier sequential (keep_original_weight=False) calls

    @classmethod
    def from_pretrained(cls, model: str = "smollm2-135m", config: "MegConfig | None" = None,
                        work_dir: str | Path | None = None, progress: bool = True) -> "MegEditorAPI":
        """Load the base model (registry name, local directory or hub id) on ``config.device``."""
        from meg import lm
        from meg.editor import MegConfig

        config = config or MegConfig()
        return cls(lm.load_model(model, device=config.device), config, work_dir, progress)

    def edit(self, prompts: str | Sequence[str], target_new: str | Sequence[str],
             ground_truth: str | Sequence[str] | None = None, rephrase_prompts: str | Sequence[str] | None = None,
             locality_inputs: dict | None = None, subject: str | Sequence[str] | None = None,
             keep_original_weight: bool = True, verbose: bool = True) -> tuple[list[dict], "EditedModel"]:
        """Edit the facts in; returns (per-edit metrics, the edited model). See the module docstring."""
        from meg import editor
        from meg.bundle import record_edits

        edits, loc = self._requests(prompts, target_new, ground_truth, rephrase_prompts, locality_inputs, subject)
        t0 = time.time()
        base = self._base()
        pre = _quality(base, edits, loc, labels=None)
        labels = {name: pre_loc["outputs"] for name, pre_loc in pre["locality"].items()}
        all_edits = edits if keep_original_weight else self.history + edits
        model = editor.build(self.loaded, all_edits, self.config, work_dir=self.work_dir,
                             progress=self.progress and verbose)
        record_edits(model, all_edits)
        if not keep_original_weight:
            self.history = all_edits
        post = _quality(model, edits, loc, labels=labels)
        _, routed, _, _ = model.route([e.prompt for e in edits])
        seconds = time.time() - t0
        metrics = [self._case(i, e, loc, pre, post, bool(routed[i]), seconds) for i, e in enumerate(edits)]
        if verbose:
            ok = sum(m["post"]["rewrite_ag"][0] for m in metrics)
            print(f"meg: {len(edits)} edits in {seconds:.1f} s; rewrite (AG) {ok:.0f}/{len(edits)}", flush=True)
        return metrics, model

    # ---- helpers

    def _base(self):
        from meg.evaluate import EditedLM

        return EditedLM(self.loaded)

    def _requests(self, prompts, target_new, ground_truth, rephrase_prompts, locality_inputs, subject):
        from meg.facts import EditRequest, Probe, _auto_id

        prompts = _as_list("prompts", prompts, len([prompts] if isinstance(prompts, str) else prompts), True)
        n = len(prompts)
        if n == 0:
            raise ConfigError("edit: 'prompts' is empty")
        targets = _as_list("target_new", target_new, n, required=True)
        truths = _as_list("ground_truth", ground_truth, n)
        rephrases = _as_list("rephrase_prompts", rephrase_prompts, n)
        subjects = _as_list("subject", subject, n)
        loc = _locality_sets(locality_inputs, n)
        edits = []
        for i in range(n):
            for name, value in (("prompts", prompts[i]), ("target_new", targets[i])):
                if not isinstance(value, str) or not value.strip():
                    raise ConfigError(f"edit: '{name}'[{i}] must be a non-empty string, got {value!r}")
            first_loc = next(iter(loc.values()), None)
            edits.append(EditRequest(
                id=_auto_id(prompts[i]), prompt=prompts[i], target_new=targets[i],
                target_old=truths[i] if truths else None, subject=subjects[i] if subjects else None,
                paraphrases=(rephrases[i],) if rephrases and rephrases[i] else (),
                locality=(Probe(first_loc[0][i], first_loc[1][i] if first_loc[1] else None),) if first_loc else (),
                source=f"api:edit {i}",
            ))
        return edits, loc

    @staticmethod
    def _case(i, e, loc, pre, post, routed, seconds) -> dict:
        def section(q, extra):
            out = {"rewrite_acc": [q["rewrite_acc"][i]], "rewrite_ag": [q["rewrite_ag"][i]]}
            if e.paraphrases:
                out |= {"rephrase_acc": [q["rephrase_acc"][i]], "rephrase_ag": [q["rephrase_ag"][i]]}
            return out | extra

        pre_loc = {f"{name}_output": pre["locality"][name]["outputs"].texts[i] for name in loc}
        post_loc = {}
        for name in loc:
            post_loc[f"{name}_acc"] = [post["locality"][name]["acc"][i]]
            post_loc[f"{name}_ag"] = [post["locality"][name]["ag"][i]]
        return {
            "case_id": i,
            "requested_rewrite": {
                "id": e.id, "prompt": e.prompt, "target_new": e.target_new, "ground_truth": e.target_old,
                "subject": e.subject, "rephrase_prompt": e.paraphrases[0] if e.paraphrases else None,
                "locality": {name: {"prompt": p[i], "ground_truth": t[i] if t else None}
                             for name, (p, t) in loc.items()},
            },
            "time": seconds,
            "pre": section(pre, {"locality": pre_loc}),
            "post": section(post, {"locality": post_loc, "routed": routed}),
        }


def _quality(model, edits: list, loc: dict, labels: dict | None) -> dict:
    """Per-edit TF accuracy and AG exact match of the targets, and locality against ``labels``.

    With ``labels`` None (the pre-edit model), its locality answers are recorded as the labels.
    """
    from meg.evaluate import LocalityLabels, _answer_ids, normalise_answer

    n = len(edits)
    prompts = [e.prompt for e in edits]
    paras = [e.paraphrases[0] if e.paraphrases else e.prompt for e in edits]
    targets = [e.target_new for e in edits]
    texts = model.generate(prompts + paras)
    acc, _ = model.score(prompts + paras, targets + targets)
    want = [normalise_answer(t) for t in targets]
    out = {
        "rewrite_acc": acc[:n], "rephrase_acc": acc[n:],
        "rewrite_ag": [float(normalise_answer(t) == w) for t, w in zip(texts[:n], want)],
        "rephrase_ag": [float(normalise_answer(t) == w) for t, w in zip(texts[n:], want)],
        "locality": {},
    }
    tok = model.loaded.tokenizer
    for name, (loc_prompts, _) in loc.items():
        if labels is None:
            gen = model.generate_ids(loc_prompts)
            decoded = [tok.decode(g, skip_special_tokens=True) for g in gen]
            out["locality"][name] = {"outputs": LocalityLabels(loc_prompts, decoded,
                                                               [_answer_ids(tok, g) for g in gen])}
        else:
            lab = labels[name]
            loc_acc, _ = model.score_ids(lab.prompts, lab.token_ids)
            loc_texts = model.generate(lab.prompts)
            out["locality"][name] = {
                "acc": loc_acc,
                "ag": [float(normalise_answer(t) == normalise_answer(l)) for t, l in zip(loc_texts, lab.texts)],
            }
    return out
