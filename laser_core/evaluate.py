"""Score a model on examples: accuracy and log-loss by LASER's rules, batched, with a lean output head.

Rules:
- multiple choice, causal LM: summed log-prob of each choice's tokens after the prompt; when every
  choice is one token, one forward of the prompt and a comparison of the choice logits at its end.
  Otherwise the prompt is run once for all of a question's choices: prompt and choices are packed into one
  row, each choice attending to the prompt and to itself only, with its own positions (a tree-shaped
  attention mask), where a probe shows the architecture gives the same log-probs that way (see
  :func:`prompt_sharing_ok`); else each choice is its own row.
  The lead every sequence starts with (an instruction, a few-shot preamble) runs once per evaluation and
  every row attends to its keys and values, where a probe shows the same log-probs (:func:`split_lead`).
- multiple choice, masked LM: the choice's (first) token logit at a ``<mask>`` placed after the prompt.
- generation: greedy decoding; correct when an accepted answer occurs (case-insensitive) in the generated
  text only (cut at its first newline), never in the prompt.
Log-loss: mean over examples of the per-token negative log-prob of the correct answer (nats/token). It is
also the loss L whose gradient the scores use.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import Cancelled, ConfigError, NumericsError
from .models import LoadedModel
from .prefix import (LeadCache, StopForward, block_list, capture_first_arg, empty_cache, from_layer, last_mlp,
                     lean_last_block, record_until, stubbable, stubbed, tensor_bytes)
from .sequences import (Seq, encode, lead_length, least_padded_batches, packed_row, prompt_ids, tree_mask,
                        without_lead)
from .tasks import Example

log = logging.getLogger(__name__)


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


def build_sequences(lm: LoadedModel, examples: Sequence[Example], gold_only: bool = False,
                    share_prompt: bool | None = None) -> tuple[list[Seq], bool]:
    """Tokenise examples into scored sequences. Returns (sequences, single_token_fast_path).

    ``share_prompt`` packs a multiple-choice question's prompt and all its choices into one sequence:
    True always, False never, None where :func:`prompt_sharing_ok` (probed only once a question would be packed).
    """
    tok = lm.tokenizer
    lean_block_ok(lm)  # probed here, before any caller puts hooks on the model for the forward that follows
    if lm.kind == "masked":
        if any(e.kind != "mc" for e in examples):
            raise ConfigError("generation tasks need a causal LM; this is a masked LM")
        if tok.mask_token is None:
            raise ConfigError("this masked LM's tokenizer has no mask token")
        seqs = []
        for i, e in enumerate(examples):
            ids = encode(tok, e.prompt + " " + tok.mask_token, special=True)
            pos = ids.index(tok.mask_token_id)
            rows = [(encode(tok, c) or [tok.unk_token_id])[0] for c in e.choices]
            seqs.append(Seq(ids, [pos], [], rows, i))
        return seqs, True
    cont = [[encode(tok, c) for c in (e.choices or e.targets[:1])] for e in examples]
    fast = all(e.kind == "mc" for e in examples) and all(len(c) == 1 for cs in cont for c in cs)
    seqs = []
    for i, (e, cs) in enumerate(zip(examples, cont)):
        p = prompt_ids(lm, e.prompt)
        if fast:
            seqs.append(Seq(p, [len(p) - 1], [], [c[0] for c in cs], i))
            continue
        for j, c in enumerate(cs):
            if not c:
                raise ConfigError(f"example {i}: choice {j} tokenises to nothing")
        if (share_prompt is not False and not gold_only and e.kind == "mc" and len(cs) > 1
                and (share_prompt or prompt_sharing_ok(lm))):
            seqs.append(packed_row(p, cs, i))
            continue
        for j, c in enumerate(cs):
            if gold_only and e.kind == "mc" and j != e.answer:
                continue
            ids = p + c
            seqs.append(Seq(ids, list(range(len(p) - 1, len(ids) - 1)), c, None, i, j))
    return seqs, fast


def _rows_and_batches(lm: LoadedModel, examples: Sequence[Example], max_tokens: int,
                      gold_only: bool = False) -> tuple[list[Seq], bool, list[int], list[list[int]]]:
    """For one evaluation: the sequences (without their shared lead), the fast-path flag, the lead and the batches."""
    seqs, fast = build_sequences(lm, examples, gold_only=gold_only)
    lead, seqs = split_lead(lm, seqs)
    return seqs, fast, lead, least_padded_batches(lm, seqs, max_tokens, lead=len(lead))


def split_lead(lm: LoadedModel, seqs: list[Seq], min_share: float = 0.05) -> tuple[list[int], list[Seq]]:
    """The lead every sequence starts with, and the sequences without it (their positions kept).

    The lead is run once per evaluation (:func:`_lead_cache`) and every row attends to its keys and values,
    instead of each row running it again: a few-shot preamble is most of truthful_qa's tokens. Done where
    it saves at least ``min_share`` of the tokens and :func:`lead_sharing_ok`; else returns ``([], seqs)``.
    """
    if lm.kind != "causal" or len(seqs) < 2:
        return [], seqs
    n = lead_length(seqs)
    if n < 2 or n * (len(seqs) - 1) < min_share * sum(len(s.ids) for s in seqs) or not lead_sharing_ok(lm):
        return [], seqs
    return seqs[0].ids[:n], [without_lead(s, n) for s in seqs]


def _body_and_head(model: torch.nn.Module, kind: str):
    """(body, head) so that head(body(x).last_hidden_state) are the logits; (None, None) if unknown."""
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        return None, None
    head = (getattr(model, "lm_head", None) or getattr(model, "cls", None)) if kind == "masked" \
        else model.get_output_embeddings()
    return (body, head) if head is not None else (None, None)


class PrefixStates:
    """Hidden states entering block ``layer`` for every batch of ``examples``, from the base weights.

    An edit at layer >= ``layer`` cannot change them, so a candidate there is evaluated by running blocks
    ``layer..L`` only (see :func:`evaluate`'s ``prefix``). Build them with the model unedited.
    :meth:`at_matrix` goes further inside block ``layer``. The sequences' shared lead (see :func:`split_lead`)
    has its own states (``lead_state``); it runs once per evaluation, block ``layer`` whole (one row).
    """

    def __init__(self, lm: LoadedModel, examples: Sequence[Example], layer: int, max_tokens: int = 8192) -> None:
        found = block_list(lm)
        if found is None:
            raise ConfigError("prefix reuse needs a model whose blocks sit in one ModuleList")
        blocks = found[2]
        self.layer = layer
        self.seqs, self.fast, self.lead, self.batches = _rows_and_batches(lm, examples, max_tokens)
        self.stubs: list[dict] | None = None  # per batch: recorded outputs of block ``layer``'s early modules
        self.lead_state: torch.Tensor | None = None  # the lead's hidden states entering block ``layer``
        self.matrices: dict[str, PrefixStates] = {}

        def captured(run: Callable):
            """(the input of block ``layer``, what ``run`` returned, None where the capture stopped it)."""
            got: list[torch.Tensor] = []
            handle = blocks[layer].register_forward_pre_hook(capture_first_arg(got), with_kwargs=True)
            try:
                out = run()
            except StopForward:
                out = None
            finally:
                handle.remove()
            return got[0], out

        with torch.no_grad():
            lead = None
            if self.lead:  # first: the batches attend to its keys and values in the blocks before ``layer``
                self.lead_state, lead = captured(lambda: _lead_cache(lm, self.lead))
            self.states = [captured(lambda: _scored_logprobs(lm, [self.seqs[i] for i in idx], lead=lead))[0]
                           for idx in self.batches]

    @property
    def nbytes(self) -> int:
        """RAM held: the states, and the recorded outputs of every matrix entry made from them."""
        return tensor_bytes([self.states, self.stubs, self.lead_state]) + sum(tensor_bytes(p.stubs) for p in self.matrices.values())

    def at_matrix(self, lm: LoadedModel, name: str, min_share: float = 0.1,
                  max_bytes: int | None = None) -> "PrefixStates":
        """These states plus, for an edit of matrix ``name`` (in block ``layer``), the outputs of the modules of
        that block that return before the matrix is first called: they run no more (e.g. the attention, for
        an MLP matrix). Built from the unedited model on the first call, then kept.

        Returns ``self`` where those modules hold under ``min_share`` of the block's parameters (too little
        to be worth the RAM), share a parameter with the matrix, or their outputs would take more than
        ``max_bytes`` (estimated from the first batch).
        """
        if name in self.matrices:
            return self.matrices[name]
        block = block_list(lm)[2][self.layer]
        target = lm.model.get_submodule(name.rsplit(".", 1)[0])
        weight = lm.model.get_parameter(name)
        total = sum(p.numel() for p in block.parameters())
        tokens = [len(idx) * max(len(self.seqs[i].ids) for i in idx) for idx in self.batches]
        stubs: list[dict] = []
        entry = self
        with torch.no_grad():
            lead = _lead_cache(lm, self.lead, (self.layer, self.lead_state, None)) if self.lead else None
            for bn, idx in enumerate(self.batches):
                record: dict = {}
                with record_until(block, target, record):
                    try:
                        _scored_logprobs(lm, [self.seqs[i] for i in idx], (self.layer, self.states[bn], None), lead=lead)
                    except StopForward:
                        pass
                if bn == 0:
                    names = stubbable(block, record, min_params=total // 100)
                    params = [p for n in names for p in block.get_submodule(n).parameters()]
                    size = tensor_bytes([record[n]["out"] for n in names]) * sum(tokens) / tokens[0]
                    if (sum(p.numel() for p in params) < min_share * total or any(p is weight for p in params)
                            or (max_bytes is not None and size > max_bytes)):
                        break
                stubs.append({n: record[n]["out"] for n in names})
            else:
                entry = copy.copy(self)
                entry.stubs, entry.matrices = stubs, {}
        self.matrices[name] = entry
        return entry


def _scored_logprobs(lm: LoadedModel, batch: list[Seq], start: tuple | None = None,
                     lean: bool | None = None, lead: LeadCache | None = None) -> list[torch.Tensor]:
    """For each sequence: log-probs at its scored positions, over ``rows`` (fast path) or of ``tgt`` tokens.

    ``start=(layer, states, stubs)`` runs the blocks from ``layer`` on, fed with the cached ``states``; ``stubs``
    (or None) are recorded outputs of block ``layer``'s modules that run before the edited matrix.
    ``lean`` runs the last block's MLP at the scored positions only (None: where :func:`lean_block_ok` found it
    exact; it is probed by :func:`build_sequences`, which every caller runs first).
    ``lead``: the keys and values of the lead the sequences follow (see :func:`split_lead`), from the same
    weights and ``start``.
    """
    return _head_logprobs(lm, batch, _scored_rows(lm, batch, start, lean, lead))


def _scored_rows(lm: LoadedModel, batch: list[Seq], start: tuple | None = None, lean: bool | None = None,
                 lead: LeadCache | None = None, fill=None) -> torch.Tensor:
    """The last hidden state at every scored position of ``batch``, in order, for the head to finish; the logits
    there where the model has no separable head (see ``_body_and_head``). Arguments as for ``_scored_logprobs``;
    ``fill``: a cache the forward fills with its keys and values (see :func:`_lead_cache`)."""
    model, dev = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    width = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, s in enumerate(batch):
        ids[b, :len(s.ids)] = torch.tensor(s.ids)
        mask[b, :len(s.ids)] = 1
    extra = {"use_cache": False} if lm.kind == "causal" else {}
    past = lead.past(model, len(batch)) if lead is not None else fill
    if past is not None or any(s.groups is not None for s in batch):
        mask, positions = tree_mask(batch, width, next(model.parameters()).dtype, lead.length if lead else 0)
        extra["position_ids"] = positions.to(dev)
    if past is not None:
        extra.update(use_cache=True, past_key_values=past)
    ids, mask = ids.to(dev), mask.to(dev)
    bi = torch.tensor([b for b, s in enumerate(batch) for _ in s.pos], dtype=torch.long, device=dev)
    pi = torch.tensor([p for s in batch for p in s.pos], dtype=torch.long, device=dev)
    body = _body_and_head(model, lm.kind)[0]
    with contextlib.ExitStack() as stack:
        if start is not None:
            if start[2]:
                stack.enter_context(stubbed(block_list(lm)[2][start[0]], start[2]))
            stack.enter_context(from_layer(lm, start[0], start[1]))
        if lean if lean is not None else lm.lean_block:
            stack.enter_context(lean_last_block(lm, torch.unique(bi * width + pi)))
        if body is not None:
            return body(input_ids=ids, attention_mask=mask, **extra).last_hidden_state[bi, pi]
        return model(input_ids=ids, attention_mask=mask, **extra).logits[bi, pi]


def _lead_cache(lm: LoadedModel, lead: list[int], start: tuple | None = None) -> LeadCache:
    """Run the lead alone (one row, from ``start`` as in :func:`_scored_logprobs`) and keep its keys and values.

    A capture hook that stops the forward at a block (see :class:`PrefixStates`) leaves the blocks before it
    filled, all that the batches stopped at the same block need.
    """
    cache = empty_cache(lm.model)
    try:
        _scored_rows(lm, [Seq(list(lead), [], [])], start, lean=False, fill=cache)
    except StopForward:
        pass
    return LeadCache(len(lead), cache)


def _head_logprobs(lm: LoadedModel, batch: list[Seq], rows: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence of ``batch``, the log-probs of :func:`_scored_logprobs` from its :func:`_scored_rows`; the
    output head runs only at those rows (the lean head)."""
    model, dev = lm.model, lm.device
    head = _body_and_head(model, lm.kind)[1]
    logits = head(rows) if head is not None else rows
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp = torch.log_softmax(logits.float(), dim=-1)
    out, k = [], 0
    for s in batch:
        n = len(s.pos)
        rows = logp[k:k + n]
        out.append(rows[0, s.rows] if s.rows is not None else rows.gather(1, torch.tensor(s.tgt, device=dev)[:, None])[:, 0])
        k += n
    return out


_PROBE = [Example("Question: is the sky blue on a clear day?\nAnswer:", ("yes, it is", "no", "it depends"), 0)]


def _probe_matches(lm: LoadedModel, plain: Callable[[], torch.Tensor], fast: Callable[[], torch.Tensor], what: str) -> bool:
    """Do two ways of scoring the probe question agree within 1e-4? Any error in either means no."""
    try:
        with torch.no_grad():
            a, b = plain(), fast()
        ok = a.shape == b.shape and bool(torch.allclose(a, b, atol=1e-4, rtol=0))
    except Exception as e:  # noqa: BLE001 - any failure means: not on this architecture
        log.info("%s disabled for this model: %s", what, e)
        return False
    if not ok:
        log.info("%s disabled for this model: the probe's log-probs differ", what)
    return ok


def prompt_sharing_ok(lm: LoadedModel) -> bool:
    """Does this model give the same choice log-probs with the prompt shared (packed) as run per choice?

    Probed once per loaded model on a made-up question (tree masks need an architecture that honours a
    custom 4-D mask and position ids); a model that differs by more than 1e-4 or raises runs each choice
    in its own row.
    """
    if lm.prompt_sharing is None:
        lm.prompt_sharing = lm.kind == "causal" and _probe_matches(
            lm, lambda: torch.cat(_scored_logprobs(lm, build_sequences(lm, _PROBE, share_prompt=False)[0])),
            lambda: _scored_logprobs(lm, build_sequences(lm, _PROBE, share_prompt=True)[0])[0], "prompt sharing")
    return lm.prompt_sharing


_LEAD_PROBE = [Example("Answer in a few words.\nQuestion: is the sky blue on a clear day?\nAnswer:", ("yes, it is", "no"), 0),
               Example("Answer in a few words.\nQuestion: is ice hot?\nAnswer:", ("no", "yes, very hot"), 0)]


def lead_sharing_ok(lm: LoadedModel) -> bool:
    """Does this model give the same log-probs with the shared lead run once, as a cached past, as run in every row?

    Probed once per loaded model on two made-up questions (rows of different lengths, so padding included);
    needs a causal model whose attention takes a transformers cache with a custom 4-D mask and position ids.
    """
    if lm.lead_sharing is None:
        seqs = build_sequences(lm, _LEAD_PROBE, share_prompt=False)[0]
        n = lead_length(seqs)
        rest = [without_lead(s, n) for s in seqs]
        lm.lead_sharing = lm.kind == "causal" and n >= 2 and _probe_matches(
            lm, lambda: torch.cat(_scored_logprobs(lm, seqs)),
            lambda: torch.cat(_scored_logprobs(lm, rest, lead=_lead_cache(lm, seqs[0].ids[:n]))), "lead sharing")
    return lm.lead_sharing


def lean_block_ok(lm: LoadedModel) -> bool:
    """Does running the last block's MLP at the scored positions only give the same log-probs?

    Probed once per loaded model (rows of different lengths, so padding included); needs blocks with a
    per-position ``mlp`` module. Where it does not match within 1e-4, or raises, the last block runs whole.
    """
    if lm.lean_block is None:
        lm.lean_block = False  # the probe itself runs with the last block whole
        if last_mlp(lm) is None:
            return False
        seqs = build_sequences(lm, _PROBE, share_prompt=False)[0]
        lm.lean_block = _probe_matches(lm, lambda: torch.cat(_scored_logprobs(lm, seqs, lean=False)),
                                       lambda: torch.cat(_scored_logprobs(lm, seqs, lean=True)), "lean last block")
    return lm.lean_block


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NumericsError(f"{what} is NaN or infinite (the model's output overflowed; try float32)")


def loss_backward(lm: LoadedModel, examples: Sequence[Example], max_tokens: int = 4096,
                  cancel: CancelToken | None = None, progress: Callable[[int, int], None] | None = None) -> float:
    """Accumulate ``d log_loss / d weight`` into ``.grad`` of the parameters that require grad.

    Runs batch by batch (backward after each) so memory stays that of one batch. Returns the log-loss.
    """
    seqs, fast, lead, batches = _rows_and_batches(lm, examples, max_tokens, gold_only=True)
    ex = list(examples)
    total = 0.0
    for bn, idx in enumerate(batches):
        if cancel:
            cancel.check()
        batch = [seqs[i] for i in idx]
        lps = _scored_logprobs(lm, batch, lead=_lead_cache(lm, lead) if lead else None)  # per batch: one graph each
        terms = []
        for s, lp in zip(batch, lps):
            e = ex[s.example]
            terms.append(-lp[e.answer] if (fast or lm.kind == "masked") else -lp.mean())
        loss = torch.stack(terms).sum() / len(ex)
        _check_finite(loss, "the calibration loss")
        loss.backward()
        total += loss.item()
        if progress:
            progress(bn + 1, len(batches))
    return total


@torch.no_grad()
def evaluate(lm: LoadedModel, examples: Sequence[Example], max_new_tokens: int = 12, max_tokens: int = 8192,
             cancel: CancelToken | None = None, beat: tuple[float, float] | None = None,
             prefix: PrefixStates | None = None, head_rows: int = 1024) -> EvalResult:
    """Accuracy and log-loss of ``lm`` on ``examples`` (see the module docstring for the rules).

    Args:
        beat: (accuracy, log_loss) of the current best. When given, evaluation stops as soon as this
            candidate can no longer reach that accuracy, and the result is marked ``stopped_early``
            (its numbers then cover the examples seen; it cannot be the best either way).
        prefix: cached hidden states entering block ``prefix.layer`` for these same examples; only blocks
            from that layer on are run (and of that block, with :meth:`PrefixStates.at_matrix`, only what
            follows the edited matrix). Exact as long as no edit touches a layer below ``prefix.layer`` (nor,
            for a matrix entry, a module of that block that runs before the matrix).
        head_rows: the output head runs once over the scored rows of consecutive batches, up to this many
            rows (it reads its whole weight on every run, which costs as much as a late candidate's blocks);
            with ``beat`` it runs after every batch, so that a candidate stops as soon as it can.
    """
    examples = list(examples)
    if not examples:
        raise ConfigError("nothing to evaluate: the example list is empty")
    if examples[0].kind == "gen":
        return _evaluate_generation(lm, examples, max_new_tokens, cancel, max_tokens)
    if prefix is not None:
        seqs, fast, batches = prefix.seqs, prefix.fast, prefix.batches
        lead = _lead_cache(lm, prefix.lead, (prefix.layer, prefix.lead_state, None)) if prefix.lead else None
    else:
        seqs, fast, lead_ids, batches = _rows_and_batches(lm, examples, max_tokens)
        lead = _lead_cache(lm, lead_ids) if lead_ids else None
    n = len(examples)
    scores = [[-math.inf] * len(e.choices) for e in examples]
    gold_nll = [0.0] * n
    remaining = [len(e.choices) if not (fast or lm.kind == "masked") else 1 for e in examples]
    done_correct, done = 0, 0
    stopped = False
    pending: list[Seq] = []  # sequences of the batches whose head has not run yet, and their scored rows
    pending_rows: list[torch.Tensor] = []
    for bn, idx in enumerate(batches):
        if cancel:
            cancel.check()
        batch = [seqs[i] for i in idx]
        start = (prefix.layer, prefix.states[bn], prefix.stubs[bn] if prefix.stubs else None) if prefix else None
        pending += batch
        pending_rows.append(_scored_rows(lm, batch, start, lead=lead))
        if sum(len(r) for r in pending_rows) < head_rows and bn + 1 < len(batches) and beat is None:
            continue  # the head reads its whole weight once per call: run it over many batches' rows at once
        together, lps = pending, _head_logprobs(lm, pending, torch.cat(pending_rows))
        pending, pending_rows = [], []
        for s, lp in zip(together, lps):
            e = examples[s.example]
            if s.rows is not None:
                scores[s.example] = lp.tolist()
                gold_nll[s.example] = -float(lp[e.answer])
            elif s.spans is not None:  # every choice of the question in one row
                parts = lp.split(s.spans)
                scores[s.example] = [float(x.sum()) for x in parts]
                gold_nll[s.example] = -float(parts[e.answer].mean())
                remaining[s.example] = 1
            else:
                scores[s.example][s.choice] = float(lp.sum())
                if s.choice == e.answer:
                    gold_nll[s.example] = -float(lp.mean())
            remaining[s.example] -= 1
            if remaining[s.example] == 0:
                done += 1
                done_correct += int(max(range(len(e.choices)), key=lambda j: scores[s.example][j]) == e.answer)
        if beat is not None and (done_correct + (n - done)) / n < beat[0]:
            stopped = True
            break
    preds = [max(range(len(s)), key=lambda j: s[j]) for s in scores]
    correct = [p == e.answer for p, e in zip(preds, examples)]
    if stopped:
        seen = [i for i in range(n) if remaining[i] == 0]
        return EvalResult(sum(correct[i] for i in seen) / n, sum(gold_nll[i] for i in seen) / max(1, len(seen)),
                          n, correct, preds, stopped_early=True)
    ll = sum(gold_nll) / n
    if not math.isfinite(ll):
        raise NumericsError("the log-loss is NaN or infinite (the model's output overflowed; try float32)")
    return EvalResult(sum(correct) / n, ll, n, correct, preds, choice_logprobs=scores)


def _evaluate_generation(lm: LoadedModel, examples: list[Example], max_new_tokens: int,
                         cancel: CancelToken | None, max_tokens: int = 8192) -> EvalResult:
    if lm.kind != "causal":
        raise ConfigError("generation tasks need a causal LM")
    tok, model, dev = lm.tokenizer, lm.model, lm.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = [prompt_ids(lm, e.prompt) for e in examples]
    texts: list[str] = [""] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), 32):
        if cancel:
            cancel.check()
        idx = order[start:start + 32]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(idx):  # left padding: every prompt ends at the same column
            ids[b, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[b, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, num_beams=1)
        for b, i in enumerate(idx):
            texts[i] = tok.decode(out[b, width:], skip_special_tokens=True)
    answers = [t.strip().split("\n")[0] if t.strip() else "" for t in texts]
    correct = [any(a.strip().lower() in ans.lower() for a in e.targets) for ans, e in zip(answers, examples)]
    seqs, _ = build_sequences(lm, examples)
    nll = [0.0] * len(examples)
    for bidx in least_padded_batches(lm, seqs, max_tokens):
        batch = [seqs[i] for i in bidx]
        for s, lp in zip(batch, _scored_logprobs(lm, batch)):
            nll[s.example] = -float(lp.mean())
    return EvalResult(sum(correct) / len(examples), sum(nll) / len(examples), len(examples), correct, answers)
