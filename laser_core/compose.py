"""Greedy composition of edits across matrices, as LASER composes reductions across layers.

A search finds the best single edit. Edits of several matrices can do better together, and what they do
together is not what each did alone, so it is measured: starting from one evaluated edit (a search's best), each
other matrix's best candidate on the same split, among those that beat the base model alone, best first, is
applied together with the edits kept so far and kept where the edits together score better on that split
(accuracy, then log-loss, as a search ranks). Every choice is made on the search's split; the held-out test split
is evaluated once, at the end, for the base and the edits kept, so it stays a fair check.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from .candidates import best_by_matrix, cached_edits, doc_edit, evaluate_edits, making_room, merit
from .config import Edit, SearchConfig, to_dict
from .errors import ConfigError, NumericsError
from .estimate import block_share, human_seconds
from .evaluate import CancelToken
from .models import LoadedModel
from .prefix_states import PrefixPool
from .search import SEARCH_SPLIT
from .significance import PairedChange, change_between
from .store import Store, null_store
from .tasks import Splits

log = logging.getLogger(__name__)


@dataclass
class Composition:
    """What :func:`compose_greedy` tried and kept."""

    split: str  # where every choice was made: the split the start edit was evaluated on
    start: dict  # that edit's evaluation
    steps: list[dict]  # per edit tried, in order: name, k, rho, the edits together's accuracy and log-loss, kept
    result: dict  # the evaluation on ``split`` of the edits kept (``start`` where none was added)
    edits: list[Edit]  # the edits kept, the start first
    base_test: dict | None = None  # held-out test: the base model and the edits kept (None: not evaluated)
    result_test: dict | None = None
    left: int = 0  # edits of the pool not tried, past a limit

    @property
    def added(self) -> int:
        """How many edits were kept beside the start one."""
        return len(self.edits) - 1

    def held_out_change(self) -> PairedChange | None:
        return change_between(self.base_test, self.result_test)

    def to_dict(self) -> dict:
        return to_dict(self)  # the edits too, as dicts (a grouping where not contiguous)


def compose_pool(candidates: list[dict], start: dict, base: dict | None = None) -> list[dict]:
    """The edits :func:`compose_greedy` tries beside ``start``: per other matrix, its best candidate (accuracy, then
    log-loss) of those evaluated on ``start``'s split, where it beats ``base`` (the base model on that split) alone;
    best first. Candidates stopped early are left out: their numbers cover only the examples they saw."""
    same_split = [c for c in candidates
                  if c.get("name") != start["name"] and c.get("split", start.get("split")) == start.get("split")]
    return sorted((c for c in best_by_matrix(same_split) if base is None or merit(c) > merit(base)), key=merit,
                  reverse=True)


def composition_seconds(lm: LoadedModel, tries: list[dict], start: dict, full: float, reuse: bool) -> float:
    """About how long :func:`compose_greedy` takes to try ``tries`` beside ``start`` (held-out test aside), where one
    evaluation of the split takes ``full`` seconds: with ``reuse`` (prefix reuse on and applicable), a try of an edit
    at or above ``start``'s layer runs from that layer once its states are built, and one below runs whole (an edit
    kept below it lowers that layer for the tries after it: those then take longer than this says)."""
    share = block_share(lm, start.get("layer"), reuse)
    above = sum(c["layer"] >= start["layer"] for c in tries) if share < 1 else 0
    return full * (len(tries) - above + above * share + (1 - share) * (above > 0))


def composition_estimate(lm: LoadedModel, tries: list[dict], start: dict, full: float, reuse: bool) -> str:
    """:func:`composition_seconds` in words: 'about 2 min', and where a try below ``start``'s layer comes before
    one at or above it (best first, as they are tried), that keeping it would make the later tries longer."""
    about = f"about {human_seconds(composition_seconds(lm, tries, start, full, reuse))}"
    below = [i for i, c in enumerate(tries) if c["layer"] < start["layer"]]
    later = below and block_share(lm, start.get("layer"), reuse) < 1 and any(
        c["layer"] >= start["layer"] for c in tries[below[0]:])
    return about + (f", longer where an edit below layer {start['layer']} is kept" if later else "")


class _NotCached(Exception):
    """An evaluation :func:`cached_composition` would need that the cache does not hold."""


def compose_greedy(lm: LoadedModel, splits: Splits, start: dict, candidates: list[dict], store: Store | None = None,
                   base: dict | None = None, held_out: bool = True, cancel: CancelToken | None = None,
                   progress: Callable[[dict], None] | None = None, limit: int | None = None,
                   prefix_budget_mb: int | None = SearchConfig.prefix_budget_mb) -> Composition:
    """Add other matrices' edits to ``start`` one at a time while the edits together score better on its split.

    Args:
        start: an evaluated single edit (a search's best, a cached result) with its ``split``; one stopped early is
            evaluated to the end first.
        candidates: evaluated single edits to draw from (a search's candidates, the cache's results); see
            :func:`compose_pool` for which are tried, in which order.
        base: the base model's evaluation on that split; with it, only edits that beat it alone are tried.
        held_out: evaluate the base and the edits kept on the held-out test split at the end.
        progress: called with {"phase": "compose", "done", "total", "message"} after each evaluation.
        limit: try at most this many edits of the pool, best first (None: all); the result's ``left`` counts the rest.
        prefix_budget_mb: RAM for the hidden states entering the lowest layer of the edits kept, which every try of
            an edit at that layer or above starts from (prefix reuse, as in a search; exact); None: every evaluation
            runs every block. A try of an edit below that layer runs whole, as do the two held-out test
            evaluations: nothing would reuse their states, and building them costs what they save once.

    Every evaluation goes through :func:`~laser_core.candidates.evaluate_edits` and its cache, so the same call
    again evaluates nothing (:func:`cached_composition` reads it back without a model run).

    An edit whose evaluation together with those kept overflows (``NumericsError``) is not kept; its step says why.

    Raises:
        ConfigError: ``start`` was evaluated on held-out test, which must stay unseen by the choice; ``limit`` < 1.
        Cancelled: ``cancel`` was set; the model is restored, what was evaluated stays in the cache.
    """
    store = store or null_store()
    pool = PrefixPool(lm, prefix_budget_mb * 2**20) if prefix_budget_mb is not None else None

    def evaluate(edits: list[Edit], split: str) -> dict:
        kept = edits[:-1]  # a try: the edits kept, then the one tried
        shared = pool is not None and split != "test" and bool(kept) and \
            lm.ref(edits[-1].name).layer >= min(lm.ref(e.name).layer for e in kept)
        prefixes = pool if shared else None
        return making_room(lm, prefixes, f"evaluating {len(edits)} edits together", lambda: evaluate_edits(
            lm, edits, splits, split, store, cancel, prefixes))
    return _greedy(start, candidates, base, held_out, limit, cancel, progress, evaluate)


def cached_composition(lm: LoadedModel, splits: Splits, start: dict, candidates: list[dict], store: Store,
                       base: dict | None = None, held_out: bool = True, limit: int | None = None) -> Composition | None:
    """What :func:`compose_greedy` with these arguments returns, read from the cache without running the model:
    None unless it ran before (here, from the CLI's ``--compose`` or in another session) and every evaluation it
    made is cached (a step that broke the numerics included: that is cached too, and raised again here)."""
    def lookup(edits: list[Edit], split: str) -> dict:
        doc = cached_edits(store, lm, splits, split, edits, failed=True)
        if doc is None:
            raise _NotCached
        return {**doc, "cached": True}
    try:
        return _greedy(start, candidates, base, held_out, limit, None, None, lookup)
    except _NotCached:
        return None


def _greedy(start: dict, candidates: list[dict], base: dict | None, held_out: bool, limit: int | None,
            cancel: CancelToken | None, progress: Callable[[dict], None] | None,
            evaluate: Callable[[list[Edit], str], dict]) -> Composition:
    """:func:`compose_greedy`, with ``evaluate(edits, split)`` giving each evaluation (run, or read from the cache)."""
    split = start["split"]
    if split not in SEARCH_SPLIT.values():  # choosing on held-out test would spend the split that checks the choice
        raise ConfigError(f"a composition chooses its edits on a search's split (calib or val), not on {split!r}: "
                          "start from a candidate evaluated there")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 (edits to try), got {limit}")
    if start.get("stopped_early"):  # its numbers cover only the examples it saw: compare against all of them
        start = evaluate([doc_edit(start)], split)
    pool = compose_pool(candidates, start, base)
    to_try = pool[:limit]  # best alone first; a limit of None tries them all
    left = len(pool) - len(to_try)
    total = len(to_try) + 2 * held_out
    edits, result, steps = [doc_edit(start)], start, []
    for i, cand in enumerate(to_try):
        if cancel:
            cancel.check()
        edit = doc_edit(cand)
        step = {**to_dict(edit), "alone": cand["accuracy"]}
        try:
            tried = evaluate([*edits, edit], split)
        except NumericsError as e:  # these edits together broke the model's numerics: not kept, as a search skips
            log.warning("composition: %s not kept: %s", edit.label, e)
            steps.append({**step, "accuracy": None, "log_loss": None, "kept": False, "error": str(e)})
            continue
        kept = merit(tried) > merit(result)
        steps.append({**step, "accuracy": tried["accuracy"], "log_loss": tried["log_loss"], "kept": kept})
        if kept:
            edits, result = [*edits, edit], tried
        if progress:
            progress({"phase": "compose", "done": i + 1, "total": total,
                      "message": f"+ {edit.label}: acc {tried['accuracy']:.3f}"
                                 + (" (kept)" if kept else "")})
    comp = Composition(split, start, steps, result, edits, left=left)
    if held_out:
        comp.base_test = evaluate([], "test")
        comp.result_test = evaluate(edits, "test")
        if progress:
            progress({"phase": "compose", "done": total, "total": total, "message": "held-out test: base and edits"})
    return comp
