"""`meg chat`: ask an edited model one question after another.

Lines starting with ':' are commands: ':explain' toggles explanations, ':quit' (or end of input) ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from meg.editor import EditedModel

HELP = ("Ask a question (a user turn of the model's chat template; with --raw the model completes it). "
        "':explain' toggles explanations, ':quit' ends.")


def chat_loop(model: "EditedModel", inp: TextIO, out: TextIO, explain: bool = False, max_new_tokens: int | None = None,
              **options) -> int:
    """Read questions from ``inp`` until ':quit' or end of input; returns how many were answered.

    Each question is asked on its own (routing sees it alone). ``options`` are passed to
    ``EditedModel.answer`` (meg.answer.AnswerConfig: chat, speed options).
    """
    from meg.cli_model import format_explanation

    print(f"meg chat: {model.info.get('n_edits', '?')} edits on {model.loaded.model_id}. {HELP}", file=out, flush=True)
    answered = 0
    while True:
        print("> ", end="", file=out, flush=True)
        line = inp.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        if question in (":quit", ":q", ":exit"):
            break
        if question == ":explain":
            explain = not explain
            print(f"explanations {'on' if explain else 'off'}", file=out, flush=True)
            continue
        if question.startswith(":"):
            print(HELP, file=out, flush=True)
            continue
        res = model.answer([question], explain=explain, max_new_tokens=max_new_tokens, **options)
        print(format_explanation(res["explanations"][0]) if explain else res["answers"][0], file=out, flush=True)
        answered += 1
    print("", file=out, flush=True)
    return answered
