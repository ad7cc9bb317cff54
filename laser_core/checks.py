"""What a run would say of a task's questions, said before it runs: questions past the model's context, generation
targets longer than the tokens decoded, a masked LM's tied choices. Evaluations raise or warn with the same texts
(a warning once per thread: :func:`warn_once`), and the dashboard shows them as soon as a task is chosen."""
from __future__ import annotations

import contextvars
import logging
from typing import Sequence

from .models import LoadedModel
from .sequences import choice_ids, masked_choice_tokens, masked_ids, prompt_ids, tokenised
from .tasks import Example

log = logging.getLogger(__name__)


def tie_warning(rows: Sequence[list[int]]) -> str | None:
    """The warning for the questions whose choice tokens ``rows`` (one list per question) repeat a token, or None."""
    tied = sum(len(set(r)) < len(r) for r in rows)
    return (f"{tied} of {len(rows)} questions have choices that start with the same token: a masked LM scores a "
            "choice by its first token at the <mask>, so those choices tie and the first of them is always predicted; "
            "use a causal LM for this task") if tied else None


def masked_ties(lm: LoadedModel, examples: Sequence[Example]) -> str | None:
    """For a masked LM and a multiple-choice task, the warning :func:`build_sequences` gives when questions of
    ``examples`` have choices that start with the same token (None when none do, or for a causal LM): a page can
    say it before anything runs."""
    if lm.kind != "masked" or lm.tokenizer.mask_token is None or any(e.kind != "mc" for e in examples):
        return None
    return tie_warning([masked_choice_tokens(lm, e) for e in examples])


def overflow_text(lm: LoadedModel, lengths: Sequence[int]) -> str | None:
    """The error for questions whose tokens (``lengths``, one per question: what its longest scored row or decoding
    needs) pass the model's context, or None where all fit."""
    limit = lm.context_limit
    over = [n for n in lengths if limit is not None and n > limit]
    return (f"{len(over)} of {len(lengths)} questions are longer than the model's context of {limit} tokens (the "
            f"longest needs {max(over)}): shorten or drop them, or use a model with a longer context") if over else None


def context_overflow(lm: LoadedModel, examples: Sequence[Example], max_new_tokens: int = 0) -> str | None:
    """:func:`overflow_text` for ``examples`` as an evaluation would run them (a multiple-choice question: its prompt
    and longest choice; a generation one: its prompt and ``max_new_tokens``, or its first answer if longer), so
    that a page can say it before anything runs."""
    if lm.kind == "masked":  # build_sequences says what is wrong with one whose tokenizer has no mask token
        return overflow_text(lm, [len(masked_ids(lm, e)) for e in examples]) if lm.tokenizer.mask_token else None
    prompts, cont = tokenised(lm, examples)
    lengths = []
    for e, p, cs in zip(examples, prompts, cont):
        longest = max(map(len, cs))
        lengths.append(len(p) + (max(longest, max_new_tokens) if e.kind == "gen" else longest))
    return overflow_text(lm, lengths)


def unreachable_targets(lm: LoadedModel, examples: Sequence[Example], max_new_tokens: int,
                        prompts: Sequence[list[int]] | None = None) -> str | None:
    """For a generation task, the warning for the questions none of whose targets fits in ``max_new_tokens``
    generated tokens: greedy decoding stops there, so they are never answered right (None when every question has
    one that fits, or for a multiple-choice task). A page can say it before anything runs; each generation
    evaluation says it too, passing the ``prompts``' ids it has (else they are computed here)."""
    if lm.kind != "causal" or any(e.kind != "gen" for e in examples):
        return None
    prompts = prompts if prompts is not None else [prompt_ids(lm, e.prompt) for e in examples]
    need = [min(len(choice_ids(lm, p, e.prompt, t)) for t in e.targets) for e, p in zip(examples, prompts)]
    over = [k for k in need if k > max_new_tokens]
    return (f"{len(over)} of {len(need)} questions have no accepted answer that fits in {max_new_tokens} generated "
            f"tokens (the longest of them needs {max(over)}): decoding stops there, so they are never answered "
            "right; raise max_new_tokens (--max-new-tokens, or the task form's 'max new tokens')") if over else None


_WARNED: contextvars.ContextVar[set | None] = contextvars.ContextVar("laser_core_warned", default=None)


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time it comes in this thread: evaluations repeat it for every
    candidate, and each dashboard job (a thread of its own, which starts with an empty context) shows it once."""
    seen = _WARNED.get()
    if seen is None:
        seen = set()
        _WARNED.set(seen)
    if message not in seen:
        seen.add(message)
        log.warning(message)
