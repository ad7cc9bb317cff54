"""Score a model on examples: accuracy and log-loss by LASER's rules, batched, with a lean output head.

Rules:
- multiple choice, causal LM: summed log-prob of each choice's tokens after the prompt; when every
  choice is one token, one forward of the prompt and a comparison of the choice logits at its end.
  Otherwise the prompt is run once for all of a question's choices: prompt and choices are packed into one
  row, each choice attending to the prompt and to itself only, with its own positions (a tree-shaped
  attention mask), where a probe shows the architecture gives the same log-probs that way (see
  :func:`~laser_core.forward.prompt_sharing_ok`); else each choice is its own row.
  The lead every sequence starts with (an instruction, a few-shot preamble) runs once per evaluation and
  every row attends to its keys and values, where a probe shows the same log-probs
  (:func:`~laser_core.forward.split_lead`).
- multiple choice, masked LM: the choice's (first) token logit at a ``<mask>`` placed after the prompt.
- generation: greedy decoding; correct when the generated text only (never the prompt), cut at its first newline
  or as the task file's ``stop_string`` and ``output_regex`` say (:class:`~laser_core.answers.AnswerFormat`),
  matches an accepted answer, case-insensitively, by a rule of :data:`~laser_core.answers.MATCH_RULES`: by default
  LASER's, the answer occurs in it ("contains"); or as whole words ("word"); or it starts with the answer as whole
  words ("starts"); or it is the answer ("exact").
Log-loss: mean over examples of the per-token negative log-prob of the correct answer (nats/token). It is
also the loss L whose gradient the scores use.

The forward itself (rows, batches, the shared lead, the lean head and their probes) is :mod:`laser_core.forward`;
this module adds evaluation on top (the cached prefix states it can start from are :mod:`laser_core.prefix_states`;
the gradient step of the same loss is :func:`laser_core.gradients.loss_backward`).
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .answers import FIRST_LINE, AnswerFormat, answer_matches
from .errors import Cancelled, ConfigError, NumericsError
from .checks import overflow_text, unreachable_targets, warn_once
from .forward import build_sequences, head_logprobs, lead_cache, rows_and_batches, scored_logprobs, scored_rows
from .memory import halving
from .models import LoadedModel
from .prefix import repeated
from .prefix_states import PrefixStates
from .sequences import Seq, batch_rows, least_padded_batches, prompt_ids
from .tasks import Example

log = logging.getLogger(__name__)
MIN_EVAL_TOKENS = 16  # an evaluation's batches halve down to this many padded tokens while memory runs out


class CancelToken:
    """Thread-safe flag a UI or signal handler sets; long loops call :meth:`check` between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise ``Cancelled`` once :meth:`cancel` was called."""
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


@dataclass
class EvalResult:
    """Accuracy, log-loss and per-example outcomes of one evaluation."""

    accuracy: float
    log_loss: float
    n: int
    correct: list[bool] = field(default_factory=list)
    predictions: list = field(default_factory=list)  # choice index (mc) or generated text (gen)
    stopped_early: bool = False
    choice_logprobs: list = field(default_factory=list, repr=False)  # per example, per choice (not cached)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "log_loss": self.log_loss, "n": self.n, "correct": self.correct,
                "predictions": self.predictions, "stopped_early": self.stopped_early}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        return cls(float(d["accuracy"]), float(d["log_loss"]), int(d["n"]), [bool(x) for x in d["correct"]],
                   list(d["predictions"]), bool(d.get("stopped_early", False)))


def _on_host(lps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 1-D log-prob tensors ``lps`` on the CPU, copied in one transfer: reading each sequence's values from an
    accelerator one by one would wait for the device once per sequence."""
    if not lps or lps[0].device.type == "cpu":
        return lps
    return list(torch.cat(lps).cpu().split([len(x) for x in lps]))


@torch.no_grad()
def evaluate(lm: LoadedModel, examples: Sequence[Example], max_new_tokens: int = 12, max_tokens: int = 8192,
             cancel: CancelToken | None = None, beat: tuple[float, float] | None = None,
             prefix: PrefixStates | None = None, head_rows: int = 1024, match: str = "contains",
             answer_format: AnswerFormat = FIRST_LINE) -> EvalResult:
    """Accuracy and log-loss of ``lm`` on ``examples`` (see the module docstring for the rules).

    Args:
        beat: (accuracy, log_loss) of the current best. When given, evaluation stops as soon as this
            candidate can no longer reach that accuracy, and the result is marked ``stopped_early``
            (its numbers then cover the examples seen; it cannot be the best either way). A generation task is
            checked after each batch of prompts decoded.
        prefix: cached hidden states entering block ``prefix.layer`` for these same examples; only blocks
            from that layer on are run (and of that block, with :meth:`PrefixStates.at_matrix`, only what
            follows the edited matrix). Exact as long as no edit touches a layer below ``prefix.layer`` (nor,
            for a matrix entry, a module of that block that runs before the matrix).
        head_rows: the output head runs once over the scored rows of consecutive batches, up to this many
            rows (it reads its whole weight on every run, which costs as much as a late candidate's blocks);
            with ``beat`` it runs after every batch, so that a candidate stops as soon as it can.
        match: generation tasks: the rule that says a generated answer is right (a name in ``MATCH_RULES``).
        answer_format: generation tasks: how the answer is cut from the decoded text (the task's).

    Where the device runs out of memory (without ``prefix``), the evaluation runs again in batches of half as many
    padded tokens, down to :data:`MIN_EVAL_TOKENS`, with a warning; the model's later batchings start from the size
    that fit (``lm.eval_tokens``). The same result up to float rounding.
    """
    examples = list(examples)
    if not examples:
        raise ConfigError("nothing to evaluate: the example list is empty")

    def run(tokens: int) -> EvalResult | NumericsError:
        if examples[0].kind == "gen":
            return _evaluate_generation(lm, examples, max_new_tokens, cancel, tokens, match, beat, answer_format)
        return evaluate_copies(lm, examples, 1, tokens, cancel, beat, prefix, head_rows)[0]

    def smaller(tokens: int) -> None:
        lm.eval_tokens = tokens
        log.warning("an evaluation ran out of memory on %s in batches of %d tokens: batches of %d from here on",
                    lm.device, tokens * 2, tokens)
    # from cached states, the batches are theirs: such an evaluation makes room by dropping them (candidates.making_room)
    out = run(max_tokens) if prefix is not None else \
        halving(run, lm.batch_tokens(max_tokens), MIN_EVAL_TOKENS, smaller)
    if isinstance(out, NumericsError):
        raise out
    return out


class _Tally:
    """One evaluation's scores as the head's log-probs come in, batch by batch (the rules of the module docstring)."""

    def __init__(self, examples: list[Example], fast: bool, masked: bool) -> None:
        self.examples = examples
        self.scores = [[-math.inf] * len(e.choices) for e in examples]
        self.gold_nll = [0.0] * len(examples)
        self.remaining = [len(e.choices) if not (fast or masked) else 1 for e in examples]
        self.correct = self.done = 0

    def add(self, s: Seq, lp: torch.Tensor) -> None:
        e = self.examples[s.example]
        if s.rows is not None:
            self.scores[s.example] = lp.tolist()
            self.gold_nll[s.example] = -float(lp[e.answer])
        elif s.spans is not None:  # every choice of the question in one row
            parts = lp.split(s.spans)
            self.scores[s.example] = [float(x.sum()) for x in parts]
            self.gold_nll[s.example] = -float(parts[e.answer].mean())
            self.remaining[s.example] = 1
        else:
            self.scores[s.example][s.choice] = float(lp.sum())
            if s.choice == e.answer:
                self.gold_nll[s.example] = -float(lp.mean())
        self.remaining[s.example] -= 1
        if self.remaining[s.example] == 0:
            self.done += 1
            row = self.scores[s.example]
            self.correct += int(max(range(len(row)), key=row.__getitem__) == e.answer)

    def cannot_reach(self, accuracy: float) -> bool:
        """Even every example still unscored right would leave it under ``accuracy``."""
        n = len(self.examples)
        return self.done < n and (self.correct + n - self.done) / n < accuracy

    def result(self, stopped: bool) -> EvalResult | NumericsError:
        n = len(self.examples)
        preds = [max(range(len(s)), key=s.__getitem__) for s in self.scores]
        correct = [p == e.answer for p, e in zip(preds, self.examples)]
        if stopped:
            seen = [i for i in range(n) if self.remaining[i] == 0]
            return EvalResult(sum(correct[i] for i in seen) / n,
                              sum(self.gold_nll[i] for i in seen) / max(1, len(seen)), n, correct, preds,
                              stopped_early=True)
        ll = sum(self.gold_nll) / n
        if not math.isfinite(ll):
            return NumericsError("the log-loss is NaN or infinite (the model's output overflowed; try float32)")
        return EvalResult(sum(correct) / n, ll, n, correct, preds, choice_logprobs=self.scores)


@torch.no_grad()
def evaluate_copies(lm: LoadedModel, examples: Sequence[Example], copies: int, max_tokens: int = 8192,
                    cancel: CancelToken | None = None, beat: tuple[float, float] | None = None,
                    prefix: PrefixStates | None = None,
                    head_rows: int = 1024) -> list[EvalResult | NumericsError]:
    """:func:`evaluate` of a multiple-choice task, every batch run ``copies`` times over in one forward, one
    run after another: under :func:`laser_core.stacking.stacked`, each run sees its own candidate's weights.
    Returns one result per run, or the ``NumericsError`` of a run whose log-loss overflowed (the others stand).
    ``beat`` applies to a single run only (a stack runs to the end)."""
    if beat is not None and copies > 1:
        raise ConfigError("an early stop needs one candidate per evaluation, not a stack")
    examples = list(examples)
    if prefix is not None:
        seqs, fast, batches = prefix.seqs, prefix.fast, prefix.batches
        lead = prefix.lead_past(lm, copies)
    else:
        seqs, fast, lead_ids, batches = rows_and_batches(lm, examples, max_tokens)
        lead = lead_cache(lm, lead_ids, copies=copies)
    tallies = [_Tally(examples, fast, lm.kind == "masked") for _ in range(copies)]
    stopped = False
    pending: list[tuple[int, Seq]] = []  # (run, sequence) of the batches whose head has not run yet, and their rows
    pending_rows: list[torch.Tensor] = []
    for bn, idx in enumerate(batches):
        if cancel:
            cancel.check()
        batch = [seqs[i] for i in idx]
        start = None if prefix is None else \
            (prefix.layer, repeated(prefix.states[bn], copies), repeated(prefix.stubs[bn], copies) if prefix.stubs else None)
        pending += [(c, s) for c in range(copies) for s in batch]
        pending_rows.append(scored_rows(lm, batch * copies, start, lead=lead))
        if sum(len(r) for r in pending_rows) < head_rows and bn + 1 < len(batches) and beat is None:
            continue  # the head reads its whole weight once per call: run it over many batches' rows at once
        lps = _on_host(head_logprobs(lm, [s for _, s in pending], torch.cat(pending_rows)))
        for (c, s), lp in zip(pending, lps):
            tallies[c].add(s, lp)
        pending, pending_rows = [], []
        if beat is not None and tallies[0].cannot_reach(beat[0]):
            stopped = True  # after the last batch the result is whole, whatever the best: not a stop
            break
    return [t.result(stopped) for t in tallies]


def generation_batches(lm: LoadedModel, lengths: list[int], max_new_tokens: int, max_tokens: int) -> list[list[int]]:
    """Prompts (by index) to decode together: longest first, as many rows as fit ``max_tokens`` with their decoded
    tokens, up to the rows of a multiple-choice batch (64 on a CPU, 256 on a GPU). Each decoding step reads every
    weight once for the whole batch, so fewer, fuller batches are faster: the demo's 100 qa_wikidata calibration
    prompts decoded in 7.0 s in batches of up to 64 rows on a 2-core CPU, 8.1 s in batches of 32, same text."""
    cap = batch_rows(lm)
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if out and len(out[-1]) < cap and (len(out[-1]) + 1) * (lengths[out[-1][0]] + max_new_tokens) <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _evaluate_generation(lm: LoadedModel, examples: list[Example], max_new_tokens: int, cancel: CancelToken | None,
                         max_tokens: int = 8192, match: str = "contains",
                         beat: tuple[float, float] | None = None,
                         answer_format: AnswerFormat = FIRST_LINE) -> EvalResult:
    if lm.kind != "causal":
        raise ConfigError("generation tasks need a causal LM")
    tok, model, dev = lm.tokenizer, lm.model, lm.device
    pad = lm.pad_id
    prompts = [prompt_ids(lm, e.prompt) for e in examples]
    too_long = unreachable_targets(lm, examples, max_new_tokens, prompts)
    if too_long:
        warn_once(too_long)
    past_context = overflow_text(lm, [len(p) + max_new_tokens for p in prompts])
    if past_context:
        raise ConfigError(past_context)
    n = len(examples)
    answers, correct, seen, stopped = [""] * n, [False] * n, [], False
    for idx in generation_batches(lm, [len(p) for p in prompts], max_new_tokens, max_tokens):
        if cancel:
            cancel.check()
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(idx):  # left padding: every prompt ends at the same column
            ids[b, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[b, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, num_beams=1)
        for b, i in enumerate(idx):
            answers[i] = answer_format.answer(tok.decode(out[b, width:], skip_special_tokens=True))
            correct[i] = answer_matches(answers[i], examples[i].targets, match)
        seen += idx
        if beat is not None and len(seen) < n and (sum(correct) + n - len(seen)) / n < beat[0]:
            stopped = True  # even every remaining answer right would not reach the best
            break
    scored = sorted(seen) if stopped else list(range(n))  # the log-loss of the examples decoded
    seqs, _ = build_sequences(lm, [examples[i] for i in scored])
    nll = [0.0] * len(scored)
    for bidx in least_padded_batches(lm, seqs, max_tokens):
        batch = [seqs[i] for i in bidx]
        for s, lp in zip(batch, _on_host(scored_logprobs(lm, batch))):
            nll[s.example] = -float(lp.mean())
    return EvalResult(sum(correct) / n, sum(nll) / len(scored), n, correct, answers, stopped_early=stopped)
