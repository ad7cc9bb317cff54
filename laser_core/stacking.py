"""Candidate stacking: the rho grid of one (matrix, K) evaluated in one forward per batch.

A search evaluates each (matrix, K) at several rhos. Those candidates share everything but the edited matrix: the
examples, the cached states entering the edited layer, the SVD factors. On a GPU a 135M model's evaluation of 100
examples is bound by the processor launching kernels, not by the GPU's arithmetic, so C candidates run as one
batch C times as tall (each batch's rows once per candidate, one run after another) cost far less than C
evaluations: the edited matrix multiplies each run by its own reduced weight (one batched matrix product), and
every other module runs once over all the runs. On a CPU, which is bound by the arithmetic, it saves little and
is off by default (``SearchConfig.stack``).

Exact: each run's log-probs equal its candidate's own evaluation within float rounding (tested against it on
tiny models of each architecture, 1e-4). The base weights are never written: the edited module's forward is
replaced for the call.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Sequence

import torch

from .candidates import edit_identity, result_key, result_row
from .config import Edit, SearchConfig
from .errors import ConfigError, NumericsError
from .evaluate import CancelToken, evaluate_copies
from .memory import free_memory, halving, out_of_memory, room_made
from .models import LoadedModel
from .prefix import forwards_replaced
from .prefix_states import PrefixPool
from .reduction import BlockFactors, get_factors, reduced_weight
from .store import Store
from .tasks import Splits

log = logging.getLogger(__name__)
AUTO_STACK = {"cuda": 8}  # candidates stacked by default per device type (others: 1, no stacking)
SMALL_MODEL = 10**9  # parameters: above this a model fills a GPU by itself, and stacking would only take memory


def stack_size(lm: LoadedModel, cfg: SearchConfig, splits: Splits) -> int:
    """How many candidates a search of ``cfg`` evaluates together: ``cfg.stack``, or where that is 0 (auto),
    :data:`AUTO_STACK` for small models; 1 (one at a time) for a generation task or with an early stop, which
    follow one candidate at a time."""
    if splits.task.kind != "mc" or cfg.early_stop:
        return 1
    if cfg.stack:
        return cfg.stack
    small = sum(p.numel() for p in lm.model.parameters()) < SMALL_MODEL
    return AUTO_STACK.get(lm.device.type, 1) if small else 1


def _module(lm: LoadedModel, name: str) -> torch.nn.Module | None:
    """The module whose forward applies matrix ``name``, where it is one stacking knows (a linear layer, or GPT-2's
    Conv1D: ``x @ weight + bias``) and ``name`` is its weight; else None."""
    module = lm.model.get_submodule(name.rsplit(".", 1)[0])
    if getattr(module, "weight", None) is not lm.model.get_parameter(name):
        return None
    if isinstance(module, torch.nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf")):
        return module
    return None


@contextlib.contextmanager
def stacked(lm: LoadedModel, edits: Sequence[Edit], factors: BlockFactors) -> Iterator[int]:
    """While active, ``edits`` (one matrix, K and grouping; ``factors`` its SVD) apply to one run each of a forward
    whose batch holds ``len(edits)`` runs one after another (see :func:`~laser_core.evaluate.evaluate_copies`).
    Holds the model's lock, as an edit does; the weights themselves are not touched. Yields the number of runs.

    Raises:
        ConfigError: the edits are of different matrices or blocks, or the matrix's module is of a kind stacking
            does not know (:func:`stackable`).
    """
    if len({e.blocks for e in edits}) != 1:
        raise ConfigError("a stack holds candidates of one matrix, K and grouping")
    module = _module(lm, edits[0].name)
    if module is None:
        raise ConfigError(f"{edits[0].name}: its module is not a linear layer; evaluate its candidates one by one")
    bias, transposed = module.bias, lm.ref(edits[0].name).transposed
    with lm.lock:
        # each candidate's reduced weight as the right factor of the module's product: (runs, in, out)
        mats = torch.stack([w if transposed else w.t() for w in (reduced_weight(lm, e, factors) for e in edits)])

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            y = torch.bmm(x.reshape(len(edits), -1, x.shape[-1]), mats)
            y = y if bias is None else y + bias
            return y.reshape(*x.shape[:-1], y.shape[-1])

        with forwards_replaced([(module, forward)]):
            yield len(edits)


def stackable(lm: LoadedModel, edit: Edit) -> bool:
    """Can ``edit``'s candidates be stacked (its matrix applied by a module :func:`stacked` knows)?"""
    return _module(lm, edit.name) is not None


def stack_ahead(lm: LoadedModel, plan: list[tuple[Edit, float]], at: int, size: int, splits: Splits, split: str,
                store: Store, done: set, cancel: CancelToken | None = None, prefixes: PrefixPool | None = None,
                factors: dict | None = None) -> tuple[dict[Edit, dict | NumericsError], int]:
    """Evaluate together up to ``size`` candidates of the search ``plan`` from entry ``at`` on that share its
    (matrix, K, grouping), as :func:`~laser_core.candidates.evaluate_candidate` would one by one (each cached under
    its own key): those not cached yet, one per set of ranks (``done``: the ranks already evaluated).

    A stack that runs out of memory is evaluated again with half its candidates, until one fits (a warning says so).

    Returns:
        Each one's result, or the ``NumericsError`` its run raised (empty where fewer than two are left to stack);
        and the stack size to go on with: ``size``, or the one that fit (1: none did, go on one at a time).
    """
    first = plan[at][0]
    if not stackable(lm, first):
        return {}, size
    chosen: list[Edit] = []
    seen = set(done)
    for edit, _ in plan[at:]:
        if edit.blocks != first.blocks or len(chosen) == size:
            break
        ident = edit_identity(lm, edit)
        if ident not in seen and store.get_json(result_key(store, lm, splits, split, edit)) is None:
            seen.add(ident)
            chosen.append(edit)
    if len(chosen) < 2:
        return {}, size
    t0 = time.perf_counter()  # as evaluate_candidate's seconds: the SVD and cached states it needs included
    f = get_factors(lm, first.name, first.k, store, factors, first.grouping)
    prefix = prefixes.for_edits(splits, split, [first]) if prefixes is not None else None
    setup = time.perf_counter() - t0
    tried: list[tuple[int, float]] = []  # (candidates, when it began) of each stack run

    def run(n: int) -> list:
        tried.append((n, time.perf_counter()))
        with stacked(lm, chosen[:n], f) as runs:
            return evaluate_copies(lm, splits.examples(split), runs, cancel=cancel, prefix=prefix)

    def roomier(n: int) -> list:
        """``run(n)``; where it runs out of memory while the pool holds other layers' states, those give way first
        and it runs again at the same size: dropping them costs a rebuild where a later candidate needs them, a
        smaller stack its speed for the rest of the search."""
        return room_made(lambda: run(n), lambda: prefixes.drop_others(prefix.layer) if prefix is not None else None,
                         f"a stack of {n} candidates", lm.device)

    def smaller(n: int) -> None:
        log.warning("a stack of %d candidates ran out of memory on %s: %d at a time from here on", tried[-1][0],
                    lm.device, n)
    try:
        results = halving(roomier, len(chosen), 2, smaller)
    except Exception as e:
        if not out_of_memory(e):
            raise
        results = None  # not even 2 fit
    if results is None:  # out of the except clause: the failed run's tensors are released
        free_memory()
        log.warning("a stack of %d candidates ran out of memory on %s: one at a time from here on", tried[-1][0],
                    lm.device)
        return {}, 1
    if len(results) < len(chosen):  # halved: the search goes on at what fit (not after other layers' states gave way)
        chosen, size = chosen[:len(results)], len(results)
    seconds = (setup + time.perf_counter() - tried[-1][1]) / len(chosen)
    out: dict[Edit, dict | NumericsError] = {}
    for edit, res in zip(chosen, results):
        store.counts["eval"] += 1
        row = {**result_row(lm, edit), "split": split, "task": splits.task.name}
        key = result_key(store, lm, splits, split, edit)
        if isinstance(res, NumericsError):
            store.put_json(key, {**row, "error": str(res)})
            out[edit] = res
            continue
        doc = {**row, **res.to_dict(), "seconds": seconds, "setup_s": setup / len(chosen), "stacked": len(chosen)}
        store.put_json(key, doc)
        out[edit] = {**doc, "cached": False}
    return out, size
