"""The model's forward over token rows: tokenised sequences in, log-probs at their scored positions out.

What every evaluation and the gradient step share (see :mod:`laser_core.evaluate` for the scoring rules):
- :func:`build_sequences` turns examples into rows (one per question with its choices packed, where
  :func:`prompt_sharing_ok`); :func:`split_lead` takes off the lead every row starts with, to run once
  (:func:`lead_cache`) where :func:`lead_sharing_ok`; :func:`rows_and_batches` does both and batches the rows.
- :func:`scored_rows` runs a batch (from cached states at a layer when given, the last block's MLP only at the
  scored positions where :func:`lean_block_ok`) and :func:`head_logprobs` applies the output head at those
  positions only.
Each fast path is probed once per loaded model against the plain way on a made-up question (1e-4); a model
that differs or raises keeps the plain way.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Sequence

import torch

from .checks import overflow_text, tie_warning, warn_once
from .errors import ConfigError
from .models import LoadedModel
from .prefix import LeadCache, StopForward, block_list, empty_cache, from_layer, last_mlp, lean_last_block, stubbed
from .sequences import (Seq, lead_length, least_padded_batches, masked_choice_tokens, masked_ids, packed_row,
                        tokenised, tree_mask, without_lead)
from .tasks import Example

log = logging.getLogger(__name__)


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
            ids = masked_ids(lm, e)
            seqs.append(Seq(ids, [ids.index(tok.mask_token_id)], [], masked_choice_tokens(lm, e), i))
        too_long = overflow_text(lm, [len(s.ids) for s in seqs])
        if too_long:
            raise ConfigError(too_long)
        tie = tie_warning([s.rows for s in seqs])
        if tie:
            warn_once(tie)
        return seqs, True
    prompts, cont = tokenised(lm, examples)
    too_long = overflow_text(lm, [len(p) + max(map(len, cs)) for p, cs in zip(prompts, cont)])
    if too_long:  # else a learned position embedding fails with a bare index error mid-run
        raise ConfigError(too_long)
    fast = all(e.kind == "mc" for e in examples) and all(len(c) == 1 for cs in cont for c in cs)
    span = attention_span(lm)  # a tree mask goes on a whole batch: every row must fit the window, packed or not
    fits = span is None or all(len(p) + sum(map(len, cs)) <= span for p, cs in zip(prompts, cont))
    seqs = []
    for i, (e, cs, p) in enumerate(zip(examples, cont, prompts)):
        if fast:
            seqs.append(Seq(p, [len(p) - 1], [], [c[0] for c in cs], i))
            continue
        for j, c in enumerate(cs):
            if not c:
                raise ConfigError(f"example {i}: choice {j} tokenises to nothing")
        if (share_prompt is not False and not gold_only and e.kind == "mc" and len(cs) > 1
                and fits and (share_prompt or prompt_sharing_ok(lm))):
            seqs.append(packed_row(p, cs, i))
            continue
        for j, c in enumerate(cs):
            if gold_only and e.kind == "mc" and j != e.answer:
                continue
            ids = p + c
            seqs.append(Seq(ids, list(range(len(p) - 1, len(ids) - 1)), c, None, i, j))
    return seqs, fast


def rows_and_batches(lm: LoadedModel, examples: Sequence[Example], max_tokens: int,
                      gold_only: bool = False) -> tuple[list[Seq], bool, list[int], list[list[int]]]:
    """For one evaluation: the sequences (without their shared lead), the fast-path flag, the lead and the batches
    (of ``max_tokens`` padded tokens at most, fewer since an evaluation ran out of memory: ``lm.batch_tokens``)."""
    seqs, fast = build_sequences(lm, examples, gold_only=gold_only)
    lead, seqs = split_lead(lm, seqs)
    return seqs, fast, lead, least_padded_batches(lm, seqs, lm.batch_tokens(max_tokens), lead=len(lead))


def attention_span(lm: LoadedModel) -> int | None:
    """How many tokens back the most local attention layer of this model sees (its sliding window, or its attention
    chunk), or None where every layer sees the whole row.

    Packing a question's choices in one row and running a shared lead once both hand the model a custom 4-D mask
    (and a lead cache), which sliding-window layers do not cut to their window: they are exact only for rows no
    longer than it. On tiny Mistral, Gemma 2 and Gemma 3 models with 40- and 48-token windows, rows of 81-90
    tokens moved log-probs by up to 0.1 (and a 64-token window failed in the lead's cache); the probes, whose rows
    are short, did not see it.
    """
    config = lm.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    spans = [v for v in (getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None))
             if isinstance(v, int) and v > 0]
    return min(spans) if spans else None


def split_lead(lm: LoadedModel, seqs: list[Seq], min_share: float = 0.05) -> tuple[list[int], list[Seq]]:
    """The lead every sequence starts with, and the sequences without it (their positions kept).

    The lead is run once per evaluation (:func:`lead_cache`) and every row attends to its keys and values,
    instead of each row running it again: a few-shot preamble is most of truthful_qa's tokens. Done where
    it saves at least ``min_share`` of the tokens and :func:`lead_sharing_ok`; else returns ``([], seqs)``.
    """
    span = attention_span(lm)
    if lm.kind != "causal" or len(seqs) < 2 or (span is not None and max(len(s.ids) for s in seqs) > span):
        return [], seqs
    n = lead_length(seqs)
    if n < 2 or n * (len(seqs) - 1) < min_share * sum(len(s.ids) for s in seqs) or not lead_sharing_ok(lm):
        return [], seqs
    return seqs[0].ids[:n], [without_lead(s, n) for s in seqs]


def body_and_head(model: torch.nn.Module, kind: str):
    """(body, head) so that head(body(x).last_hidden_state) are the logits; (None, None) if unknown."""
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        return None, None
    head = (getattr(model, "lm_head", None) or getattr(model, "cls", None)) if kind == "masked" \
        else model.get_output_embeddings()
    return (body, head) if head is not None else (None, None)


def scored_logprobs(lm: LoadedModel, batch: list[Seq], start: tuple | None = None,
                     lean: bool | None = None, lead: LeadCache | None = None) -> list[torch.Tensor]:
    """For each sequence: log-probs at its scored positions, over ``rows`` (fast path) or of ``tgt`` tokens.

    ``start=(layer, states, stubs)`` runs the blocks from ``layer`` on, fed with the cached ``states``; ``stubs``
    (or None) are recorded outputs of block ``layer``'s modules that run before the edited matrix.
    ``lean`` runs the last block's MLP at the scored positions only (None: where :func:`lean_block_ok` found it
    exact; it is probed by :func:`build_sequences`, which every caller runs first).
    ``lead``: the keys and values of the lead the sequences follow (see :func:`split_lead`), from the same
    weights and ``start``.
    """
    return head_logprobs(lm, batch, scored_rows(lm, batch, start, lean, lead))


def scored_rows(lm: LoadedModel, batch: list[Seq], start: tuple | None = None, lean: bool | None = None,
                 lead: LeadCache | None = None, fill=None) -> torch.Tensor:
    """The last hidden state at every scored position of ``batch``, in order, for the head to finish; the logits
    there where the model has no separable head (see ``body_and_head``). Arguments as for ``scored_logprobs``;
    ``fill``: a cache the forward fills with its keys and values (see :func:`lead_cache`)."""
    model, dev = lm.model, lm.device
    width = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), width), lm.pad_id, dtype=torch.long)
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
    body = body_and_head(model, lm.kind)[0]
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


def lead_cache(lm: LoadedModel, lead: list[int] | None, start: tuple | None = None,
               copies: int = 1) -> LeadCache | None:
    """Run the lead alone (one row, from ``start`` as in :func:`scored_logprobs`) and keep its keys and values;
    None where there is no lead (the sequences share none). ``copies``: one row per stacked candidate (``start``'s
    states hold as many rows).

    A capture hook that stops the forward at a block (see :class:`laser_core.prefix_states.PrefixStates`) leaves the
    blocks before it filled, all that the batches stopped at the same block need.
    """
    if not lead:
        return None
    cache = empty_cache(lm.model)
    try:
        scored_rows(lm, [Seq(list(lead), [], [])] * copies, start, lean=False, fill=cache)
    except StopForward:
        pass
    return LeadCache(len(lead), cache)


def head_logprobs(lm: LoadedModel, batch: list[Seq], rows: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence of ``batch``, the log-probs of :func:`scored_logprobs` from its :func:`scored_rows`; the
    output head runs only at those rows (the lean head)."""
    model, dev = lm.model, lm.device
    head = body_and_head(model, lm.kind)[1]
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
            lm, lambda: torch.cat(scored_logprobs(lm, build_sequences(lm, _PROBE, share_prompt=False)[0])),
            lambda: scored_logprobs(lm, build_sequences(lm, _PROBE, share_prompt=True)[0])[0], "prompt sharing")
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
            lm, lambda: torch.cat(scored_logprobs(lm, seqs)),
            lambda: torch.cat(scored_logprobs(lm, rest, lead=lead_cache(lm, seqs[0].ids[:n]))), "lead sharing")
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
        lm.lean_block = _probe_matches(lm, lambda: torch.cat(scored_logprobs(lm, seqs, lean=False)),
                                       lambda: torch.cat(scored_logprobs(lm, seqs, lean=True)), "lean last block")
    return lm.lean_block
