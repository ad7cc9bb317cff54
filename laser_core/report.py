"""The paper's Table 1 on our models and tasks: base, LASER, C2I with K=1, C2I with the K grid (and, where asked, the K
grid with clustered row blocks beside it).

Every method runs on a fresh, cache-less store so that its wall time is its own; the held-out test split is
evaluated outside the timed searches, the base once per task and each method's best once. ``quick`` (for CPUs)
restricts LASER to a few layers and a capped validation split and extrapolates its time, and shrinks
the C2I grids; the output says exactly what was restricted. :mod:`laser_core.report_table` renders the result.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from .candidates import edit_identity, evaluate_candidate
from .config import CONTIGUOUS, PAPER_KS, PAPER_RHOS, Edit, ModelSpec, SearchConfig, TaskSpec, to_dict
from .errors import ConfigError
from .grouping import check_grouping
from .models import LoadedModel
from .prefix_states import PrefixPool
from .report_table import edit_text
from .search import SPEED_ONLY, SearchReport, run_search
from .significance import change_between
from .stacking import stack_ahead, stack_size
from .store import null_store
from .tasks import BUNDLED, Splits, load_task, make_splits

log = logging.getLogger(__name__)


@dataclass
class LaserTiming:
    """A LASER sweep's report, its wall time (measured or extrapolated to every layer) and how."""

    report: SearchReport
    seconds: float
    measured_seconds: float
    candidates_total: int
    note: str
    candidates_distinct: int  # edits that change the weights differently (rhos with the same ranks are one)


def laser_baseline(lm: LoadedModel, splits: Splits, rhos: Sequence[float], layers: Sequence[int] | None = None,
                   progress: Callable | None = None, held_out: bool = True, **speed) -> LaserTiming:
    """LASER's sweep (types x rhos, K=1, validation split) over ``layers`` (None: all), timed.

    With a layer subset, layer 0 and the middle layer (where not in the subset) are probed: the cached
    states a layer needs are built (timed once, as the sweep pays them once per layer), then one candidate is
    timed. A measured layer costs what its candidates took (their share of the builds included); every other
    layer costs its interpolated build plus its number of distinct edits times the interpolated candidate time
    (linear between measured layers). The sweep's best is the best of the subset only. ``held_out`` as for
    :func:`run_search` (the test evaluations are never in the time). ``speed``: :data:`SPEED_ONLY` settings of
    :class:`SearchConfig`, for the sweep and the probes alike (with a stack, a probe times a stack of its matrix's
    rhos, as the sweep evaluates them).
    """
    n_layers = lm.n_layers
    t0 = time.perf_counter()
    cfg = SearchConfig("laser", ks=(1,), rhos=tuple(rhos), layers=tuple(layers) if layers else None,
                       **speed)
    rep = run_search(lm, splits, cfg, null_store(), progress, held_out=held_out)
    measured = time.perf_counter() - t0 - rep.timings.get("test", 0.0)
    total_candidates = len(lm.matrices) * len(rhos)
    per_layer_count = {layer: len({edit_identity(lm, Edit(r.name, 1, rho)) for r in lm.matrices if r.layer == layer
                                   for rho in rhos}) for layer in range(n_layers)}
    distinct = sum(per_layer_count.values())
    if layers is None or set(layers) >= set(range(n_layers)):
        return LaserTiming(rep, measured, measured, total_candidates, "all layers measured", distinct)
    per_layer: dict[int, list[float]] = {}
    for c in rep.candidates:
        if "same_as_rho" not in c:  # a rho with the same ranks as another costs nothing (see run_search)
            per_layer.setdefault(c["layer"], []).append(c["seconds"])
    build = {layer: 0.0 for layer in per_layer}  # measured layers: builds are inside their candidates' seconds
    pool = PrefixPool(lm, cfg.prefix_budget_mb * 2**20) if cfg.prefix_reuse else None
    for layer in sorted({0, n_layers // 2} - set(per_layer)):
        ref = next(r for r in lm.matrices if r.layer == layer)
        t1 = time.perf_counter()
        if pool is not None:
            pool.get(splits, "val", layer, ref.name)
        build[layer] = time.perf_counter() - t1
        plan = [(Edit(ref.name, 1, rho), 0.0) for rho in rhos]
        docs, _ = stack_ahead(lm, plan, 0, stack_size(lm, cfg, splits), splits, "val", null_store(), set(), prefixes=pool)
        per_layer[layer] = [d["seconds"] for d in docs.values() if isinstance(d, dict)] or \
            [evaluate_candidate(lm, plan[0][0], splits, "val", null_store(), prefixes=pool)["seconds"]]
    known = sorted((layer, sum(v) / len(v), build[layer]) for layer, v in per_layer.items())

    def interp(layer: int, i: int) -> float:
        lo = max((k for k in known if k[0] <= layer), default=known[0])
        hi = min((k for k in known if k[0] >= layer), default=known[-1])
        return lo[i] if hi[0] == lo[0] else lo[i] + (hi[i] - lo[i]) * (layer - lo[0]) / (hi[0] - lo[0])

    overhead = measured - sum(c["seconds"] for c in rep.candidates)
    seconds = overhead + sum(per_layer_count[layer] * interp(layer, 1) + interp(layer, 2) for layer in range(n_layers))
    note = (f"LASER measured on layers {sorted(set(layers))} ({len(rep.candidates)} of {total_candidates} candidates), "
            f"per-candidate time probed at layers {[k[0] for k in known]} (cached states built first, counted once "
            "per layer) and interpolated; best of measured layers only")
    return LaserTiming(rep, seconds, measured, total_candidates, note, distinct)


def paper_table(model: ModelSpec, tasks: Sequence[str], quick: bool = False, seed: int = 0, n_calib: int = 100,
                n_test: int = 300, progress: Callable[[str], None] | None = None,
                on_row: Callable[[dict], None] | None = None, grouping: str = CONTIGUOUS,
                other_tasks: bool = False, speed: dict | None = None) -> dict:
    """Run base / LASER / C2I K=1 / C2I K-grid on each task; return rows plus the settings used.

    ``grouping`` other than contiguous (the paper's row blocks) also runs C2I's K grid with the rows grouped so, as
    one more column (``c2i_kgrid_<grouping>``). ``on_row(result_so_far)`` is called after each task, so a long run
    can be followed (and kept) row by row. ``other_tasks``: then each task's C2I K-grid edit on every other task's
    held-out test split, paired with that task's base (``transfer``: see :func:`transfer_rows`). ``speed``: settings
    of :data:`SPEED_ONLY` for every search, LASER's and C2I's alike (they change the times, never what is found);
    the settings record them.
    """
    check_grouping(grouping)
    speed = {name: getattr(SearchConfig, name) for name in SPEED_ONLY} | (speed or {})
    SearchConfig("c2i", **speed)  # a bad value fails here, before any task or the model is loaded
    from .models import load_model

    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ConfigError("no task given: name at least one, e.g. fever (bundled: " + ", ".join(BUNDLED) + ")")
    prepared = []  # every task is read and split first: a bad name fails in seconds, not after hours of others
    for name in tasks:
        ts = TaskSpec(name, n_calib=n_calib, n_test=n_test, seed=seed)
        task = load_task(ts)
        prepared.append((name, ts, task, make_splits(task, ts)))
    lm = load_model(model)
    rhos = (0.25, 0.1, 0.01) if quick else PAPER_RHOS
    ks = (1, 4) if quick else PAPER_KS
    q = 3 if quick else 5
    laser_layers = [lm.n_layers - 1] if quick else None
    settings = {"model": model.source, "device": str(lm.device), "machine": lm.machine,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "seed": seed, "n_calib": n_calib, "n_test": n_test,
                "q": q, "ks": list(ks), "rhos": list(rhos), "quick": quick,
                "laser_layers": laser_layers or "all", "n_val_cap": 200 if quick else None, **speed}
    rows, finals = [], []  # finals: (task, its splits, its base's held-out result, its C2I K-grid search)
    for name, ts, task, splits in prepared:
        full_val = len(splits.val)
        if quick and full_val > 200:  # LASER's validation capped; its time is scaled back to the full split
            ts = replace(ts, n_val=200)
            splits = make_splits(task, ts, warn=False)
        if progress:
            progress(f"{name}: LASER")
        laser = laser_baseline(lm, splits, rhos, laser_layers, held_out=False, **speed)
        laser_s = laser.seconds * full_val / len(splits.val)
        base_doc = held_out_result(lm, splits, None)
        out = {"task": name, "kind": splits.task.kind, "n_calib": len(splits.calib), "n_val": len(splits.val),
               "n_val_full": full_val, "n_test": len(splits.test), "base_test": base_doc["accuracy"],
               **_against_base("laser", base_doc, held_out_result(lm, splits, laser.report)),
               "laser_s": laser_s, "laser_measured_s": laser.measured_seconds, "laser_note": laser.note,
               "laser_best": edit_text(laser.report.best)}
        runs = [("c2i_k1", (1,), CONTIGUOUS), ("c2i_kgrid", ks, CONTIGUOUS)]
        runs += [(f"c2i_kgrid_{grouping}", ks, grouping)] * (grouping != CONTIGUOUS)
        for label, grid, rows_grouped in runs:
            if progress:
                progress(f"{name}: C2I K={list(grid)}" + (f", {rows_grouped} rows" if rows_grouped != CONTIGUOUS else ""))
            t0 = time.perf_counter()
            rep = run_search(lm, splits, SearchConfig("c2i", q=q, ks=tuple(grid), rhos=rhos, grouping=rows_grouped, **speed),
                             null_store(), held_out=False)
            seconds = time.perf_counter() - t0
            out.update({**_against_base(label, base_doc, held_out_result(lm, splits, rep)), f"{label}_s": seconds,
                        f"{label}_speedup": laser_s / seconds, f"{label}_best": edit_text(rep.best)})
            if label == "c2i_kgrid":
                finals.append((name, splits, base_doc, rep))
        rows.append(out)
        if on_row:
            on_row({"settings": settings, "rows": list(rows)})
    result = {"settings": settings, "rows": rows}
    if other_tasks and len(finals) > 1:
        result["transfer"] = transfer_rows(lm, finals, progress)
    return result


def transfer_rows(lm: LoadedModel, finals: list[tuple],
                  progress: Callable[[str], None] | None = None) -> list[dict]:
    """Each task's C2I K-grid best edit (``finals``: task, splits, base held-out result, search report) on every
    other task's held-out test split, paired with that task's base: ``from``, ``edit``, ``to``, ``test`` (accuracy)
    and ``change`` (``significance``), with the edit (``name``, ``k``, ``rho``, its grouping where not contiguous). A
    search chooses an edit for its own task only; this is what it does to the others."""
    out, done = [], {}  # done: (edit, task) -> its result, where two tasks' searches chose the same edit
    for name, _, _, rep in finals:
        if rep.best_edit() is None:
            continue
        for other, splits, base_doc, _ in finals:
            if other != name:
                if progress:
                    progress(f"{name}'s C2I edit on {other}")
                key = (rep.best_edit(), other)
                doc = done[key] = done.get(key) or held_out_result(lm, splits, rep)
                out.append({"from": name, "edit": edit_text(rep.best), **to_dict(rep.best_edit()), "to": other,
                            "test": doc["accuracy"], "change": change_between(base_doc, doc).to_dict()})
    return out


def held_out_result(lm: LoadedModel, splits: Splits, rep: SearchReport | None) -> dict:
    """The test-split evaluation (a result dict, per-question outcomes included) of the model with ``rep``'s best
    edit (the base where ``rep`` is None or found none)."""
    edit = rep.best_edit() if rep is not None else None
    return evaluate_candidate(lm, edit, splits, "test", null_store())


def _against_base(label: str, base: dict, doc: dict) -> dict:
    """A method's held-out accuracy and its paired change from the base: ``<label>_test``, ``<label>_change``
    (change, 95% interval, questions fixed and broken, McNemar p; see ``significance``)."""
    return {f"{label}_test": doc["accuracy"], f"{label}_change": change_between(base, doc).to_dict()}


