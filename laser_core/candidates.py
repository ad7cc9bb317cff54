"""Evaluating candidates: one edit, several applied together or none, on one split of a task, cached per model,
task split and edits (from the cached hidden states of :mod:`laser_core.prefix_states` and the SVD factors of
:mod:`laser_core.reduction`); how results rank."""
from __future__ import annotations

import math
import time
from typing import Callable

from .config import CONTIGUOUS, Edit, TaskSpec, check_one_per_matrix, to_dict
from .errors import NumericsError
from .evaluate import CancelToken, EvalResult, evaluate
from .memory import room_made
from .models import LoadedModel
from .prefix_states import PrefixPool
from .reduction import block_ranks, edited, get_factors, params_kept
from .store import Store
from .tasks import Splits


def match_ident(splits: Splits) -> dict:
    """The answer-match rule of a generation task for cache keys, where it is not LASER's (the default): results
    scored by LASER's rule keep the keys they had before there was a choice."""
    return {"match": splits.spec.match} if splits.task.kind == "gen" and splits.spec.match != TaskSpec.match else {}


def evaluate_split(lm: LoadedModel, splits: Splits, split: str, **kw) -> EvalResult:
    """:func:`~laser_core.evaluate.evaluate` on the examples of ``split``, with the task's decoding settings (its
    length, answer-match rule and answer format), which every result of the task is keyed by."""
    return evaluate(lm, splits.examples(split), splits.spec.max_new_tokens, match=splits.spec.match,
                    answer_format=splits.task.answer_format, **kw)


def split_ident(splits: Splits, split: str) -> dict:
    """What every evaluation of ``split`` depends on besides the model and edits, for cache keys: the exact
    examples, the decoding length and, for a generation task, an answer-match rule other than LASER's."""
    return {"split": splits.key(split), "max_new_tokens": splits.spec.max_new_tokens, **match_ident(splits)}


def result_key(store: Store, lm: LoadedModel, splits: Splits, split: str, edit: Edit | None) -> str:
    """Cache key of one evaluation: model weights, task, the exact examples of ``split``, edit, decoding length
    and, for a generation task, the answer-match rule."""
    ident = {**split_ident(splits, split), "edit": to_dict(edit) if edit else None}
    return store.key("result", lm.fingerprint, splits.task.digest, ident)


def doc_edit(doc: dict) -> Edit | None:
    """The edit an evaluation (a cached result or a report's row) is of; None for the base model."""
    return Edit.of(doc) if doc.get("name") else None


def cached_results(store: Store, lm: LoadedModel, splits: Splits, failed: bool = False) -> list[dict]:
    """Every evaluation of this model on exactly these splits found in the cache (earlier runs included).

    Entries made on other splits of the same task (another seed or size) are left out: their keys differ. So are
    edits that broke the model's numerics (they have no result), unless ``failed``: their entries then come too,
    with the ``error`` and no accuracy.
    """
    out = []
    for key, doc in store.iter_json(f"result/{lm.fingerprint}/{splits.task.digest}/"):
        if doc.get("split") not in ("calib", "val", "test") or (doc.get("error") and not failed):
            continue
        if key == result_key(store, lm, splits, doc["split"], doc_edit(doc)):
            out.append(doc)
    return out


def result_row(lm: LoadedModel, edit: Edit) -> dict:
    """What a result says of its edit: the edit (grouping where not contiguous), its layer, type, ranks per block
    and parameters kept."""
    ref = lm.ref(edit.name)
    ranks, kept = params_kept(ref, edit.k, edit.rho)
    return {**to_dict(edit), "layer": ref.layer, "type": ref.type, "ranks": ranks, "params_kept": kept,
            "params_full": ref.shape[0] * ref.shape[1]}


def evaluate_candidate(lm: LoadedModel, edit: Edit | None, splits: Splits, split: str, store: Store,
                       cancel: CancelToken | None = None, beat: tuple[float, float] | None = None,
                       prefixes: PrefixPool | None = None, factors: dict | None = None) -> dict:
    """Evaluate the model with ``edit`` (None = base) on ``split``; cached per (model, task split, edit).

    ``factors``: a search's in-memory memo of SVD factors (see :func:`get_factors`).

    Returns a plain dict: the edit, its layer/type/ranks, accuracy, log_loss, per-example outcomes, seconds.

    Raises:
        NumericsError: the edit makes the model's output overflow. That is cached too (it is what these weights do),
            so a search that meets this edit again skips it at once instead of re-running it.
    """
    key = result_key(store, lm, splits, split, edit)
    doc = store.get_json(key)
    if doc is not None and doc.get("error"):
        raise NumericsError(doc["error"])
    # a candidate stopped early serves again only against a best at least as high as the one it could not reach
    # (a search with another grid may hold a lower best when it comes to it); one whose bar was not recorded, never
    reusable = doc is not None and (not doc.get("stopped_early")
                                    or (beat is not None and beat[0] >= doc.get("stopped_below", math.inf)))
    if reusable:
        doc["cached"] = True
        return doc
    t0 = time.perf_counter()
    if edit is None:
        with lm.lock:
            res = evaluate_split(lm, splits, split, cancel=cancel)
        row = {"name": None, "layer": None, "type": None, "k": None, "rho": None, "ranks": None,
               "params_kept": None, "params_full": None}
    else:
        store.counts["eval"] += 1
        f = get_factors(lm, edit.name, edit.k, store, factors, edit.grouping)
        prefix = prefixes.for_edits(splits, split, [edit]) if prefixes is not None else None
        row = {**result_row(lm, edit), "setup_s": time.perf_counter() - t0}  # its SVD and hidden states, in seconds
        try:
            with edited(lm, [edit], {edit.blocks: f}):
                res = evaluate_split(lm, splits, split, cancel=cancel, beat=beat, prefix=prefix)
        except NumericsError as e:
            store.put_json(key, {**row, "split": split, "task": splits.task.name, "error": str(e)})
            raise
    doc = {**row, "split": split, "task": splits.task.name, **res.to_dict(), "seconds": time.perf_counter() - t0}
    if res.stopped_early:
        doc["stopped_below"] = beat[0]  # it could not reach this accuracy (nor, then, any higher one)
    store.put_json(key, doc)
    doc["cached"] = False
    return doc


def making_room(lm: LoadedModel, prefixes: PrefixPool | None, doing: str, run: Callable[[], dict]) -> dict:
    """``run()`` (an evaluation from ``prefixes``' cached states), run again where it runs out of memory while
    ``prefixes`` has states to give back (:meth:`~laser_core.prefix_states.PrefixPool.make_room`: other layers'
    first, then prefix reuse itself), with a warning naming what was being done (``doing``) each time
    (:func:`~laser_core.memory.room_made`). The result is the same (prefix reuse is exact); where nothing is left
    to give, the allocator's error is raised."""
    return room_made(run, prefixes.make_room if prefixes is not None else lambda: None, doing, lm.device)


def edits_key(store: Store, lm: LoadedModel, splits: Splits, split: str, edits: list[Edit]) -> str:
    """Cache key of an evaluation of ``edits`` applied together: :func:`result_key` for one edit or none; for
    several, their set (edits of distinct matrices each reduce the base weights, so their order does not matter)
    under its own kind, which :func:`cached_results` (single edits, what a search compares) does not list."""
    if len(edits) <= 1:
        return result_key(store, lm, splits, split, edits[0] if edits else None)
    ident = {**split_ident(splits, split),
             "edits": sorted((e.name, e.k, e.rho) + ((e.grouping,) if e.grouping != CONTIGUOUS else ()) for e in edits)}
    return store.key("together", lm.fingerprint, splits.task.digest, ident)


def cached_edits(store: Store, lm: LoadedModel, splits: Splits, split: str, edits: list[Edit],
                 failed: bool = False) -> dict | None:
    """The cached evaluation of ``edits`` applied together on ``split`` (see :func:`evaluate_edits`); None when not
    computed yet, or only up to an early stop, whose accuracy counts only the examples it saw, or where the edits
    together broke the model's numerics (``failed``: raise that ``NumericsError`` again instead)."""
    doc = store.get_json(edits_key(store, lm, splits, split, edits))
    if doc is not None and doc.get("error"):
        if failed:
            raise NumericsError(doc["error"])
        return None
    return None if doc is None or doc.get("stopped_early") else doc


def cached_combinations(store: Store, lm: LoadedModel, splits: Splits) -> list[dict]:
    """Every evaluation of several edits applied together (:func:`evaluate_edits`) of this model on exactly these
    splits found in the cache: the dashboard's combinations and recipe checks, ``eval --recipe``'s."""
    return [doc for key, doc in store.iter_json(f"together/{lm.fingerprint}/{splits.task.digest}/")
            if doc.get("split") in ("calib", "val", "test") and isinstance(doc.get("edits"), list)
            and not doc.get("error")  # edits that broke the numerics together: no result to list
            and key == edits_key(store, lm, splits, doc["split"], [Edit(**e) for e in doc["edits"]])]


def evaluate_edits(lm: LoadedModel, edits: list[Edit], splits: Splits, split: str, store: Store,
                   cancel: CancelToken | None = None, prefixes: PrefixPool | None = None) -> dict:
    """Evaluate the model with all of ``edits`` at once (a recipe's, a combination's) on ``split``, cached: one
    edit (or none) goes through :func:`evaluate_candidate`; several are evaluated together and cached under
    :func:`edits_key`, and the result's ``edits`` lists them. Before, several edits were re-evaluated on every
    ask (the dashboard's combination and recipe check, ``eval --recipe``).

    Each edit's SVD factors come from ``store`` (computed once). With ``prefixes`` the evaluation starts from the
    hidden states entering the lowest edited layer (and, where one edit alone sits there, from its matrix), as a
    search's candidates do: worth it where several evaluations share that layer (a composition's steps).

    Raises:
        NumericsError: the edits together make the model's output overflow. That is cached too (it is what these
            weights do), so a composition that met it is read back whole
            (:func:`laser_core.compose.cached_composition`).
    """
    if len(edits) <= 1:
        return evaluate_candidate(lm, edits[0] if edits else None, splits, split, store, cancel)
    doc = cached_edits(store, lm, splits, split, edits, failed=True)  # several edits never stop early
    if doc is not None:
        doc["cached"] = True
        return doc
    key = edits_key(store, lm, splits, split, edits)
    t0 = time.perf_counter()
    which = {"name": None, "edits": [to_dict(e) for e in edits], "split": split, "task": splits.task.name}
    for e in check_one_per_matrix(edits):  # a wrong name or a matrix twice: before any SVD
        lm.ref(e.name)
    factors = {e.blocks: get_factors(lm, e.name, e.k, store, grouping=e.grouping) for e in edits}
    prefix = prefixes.for_edits(splits, split, edits) if prefixes is not None else None
    try:
        with edited(lm, edits, factors):
            factors.clear()  # the edits are in the weights: their SVD factors need not stay in memory meanwhile
            res = evaluate_split(lm, splits, split, cancel=cancel, prefix=prefix)
    except NumericsError as e:
        store.put_json(key, {**which, "error": str(e)})
        raise
    doc = {**which, **res.to_dict(), "seconds": time.perf_counter() - t0}
    store.put_json(key, doc)
    doc["cached"] = False
    return doc


def edit_identity(lm: LoadedModel, edit: Edit) -> tuple:
    """What an edit does to the weights: two rhos that keep the same rank in every block are one edit."""
    return edit.blocks + (tuple(block_ranks(lm.ref(edit.name).shape, edit.k, edit.rho)),)


def same_result(lm: LoadedModel, edit: Edit, splits: Splits, split: str, store: Store, same: dict) -> dict:
    """The result of ``edit`` copied from ``same``, an evaluated edit with the same ranks (another rho).

    Stored under ``edit``'s own key, so the cache answers for either rho; ``same_as_rho`` says where it came from.
    """
    key = result_key(store, lm, splits, split, edit)
    doc = {**{k: v for k, v in same.items() if k not in ("cached", "predicted_gain")}, "rho": edit.rho,
           "seconds": 0.0, "same_as_rho": same.get("same_as_rho", same["rho"])}
    store.put_json(key, doc)
    doc["cached"] = True
    return doc


def merit(doc: dict) -> tuple[float, float]:
    """How a search ranks an evaluation: higher accuracy, then lower log-loss (larger tuples are better)."""
    return doc["accuracy"], -doc["log_loss"]


def best_by_matrix(rows: list[dict]) -> list[dict]:
    """Per matrix, its best evaluated candidate (accuracy, then log-loss), as in the search. Candidates stopped
    early are left out: their numbers cover only the examples seen, and they could not win."""
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("name") and not r.get("stopped_early"):
            b = best.get(r["name"])
            if b is None or merit(r) > merit(b):
                best[r["name"]] = r
    return list(best.values())


def better(a: dict, b: dict | None) -> bool:
    """Is result ``a`` better than ``b`` (see :func:`merit`)."""
    return b is None or merit(a) > merit(b)

