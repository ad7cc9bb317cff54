"""How long a search would take here, before it runs, from evaluations already timed in the cache.

Every evaluation stored in the cache carries its wall time. A candidate costs about one full evaluation of the
searched split times the share of the model's blocks it runs (with prefix reuse: from its layer on); a candidate
already in the cache, or one with the same ranks as another rho of its matrix, costs nothing. The basis, best
first: candidates of this split already timed (each scaled back to a full evaluation by its layer's share; the
median, once there are ``MIN_RUNS``; those run together, each timed at its share of its stack, where the search
runs its candidates together, and the others where it does not), the base model on this split, the base model on
the other searched split or on the held-out test split, scaled by the example count. A C2I search whose scores are
not cached adds the gradient step and SVDs as they took for this model before (``scores.spectra_time``). Timings
taken on another device, or while the machine was busy, carry over as they are: an estimate, not a promise.
"""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from .candidates import cached_results, doc_edit, edit_identity, merit
from .config import Edit, SearchConfig
from .models import LoadedModel
from .prefix_states import prefix_reuse_applies
from .scores import c2i_plan, cached_spectra, laser_plan, score_table, spectra_ks, spectra_needed, spectra_time
from .search import SEARCH_SPLIT
from .stacking import AUTO_STACK, stack_size
from .store import Store
from .tasks import SPLIT_WORDS, Splits  # SPLIT_WORDS: imported from here by the CLI and the pages too

MIN_RUNS = 8  # candidate timings needed before their median is the basis (a layer's first one also builds its states)


@dataclass(frozen=True)
class SearchEstimate:
    """What a search still has to run, and about how long it takes on this machine."""

    seconds: float  # the base and the candidates to run, the hidden states they start from, the held-out tests
    candidates: int  # in the search's plan
    to_run: int  # neither in the cache nor a copy of another rho with the same ranks
    cached: int
    same_ranks: int
    full_eval_s: float  # one full evaluation of the searched split: the unit of the estimate
    basis: str  # where ``full_eval_s`` comes from, in words
    scores_cached: bool  # c2i: False means the gradient step and SVDs come on top, and every candidate is
    #                      counted as a full evaluation (its layer is not known before the scores are)
    upper_bound: bool  # early stop on (a candidate may stop early), c2i's layers not known yet, or candidates to
    #                    run together on a GPU timed only one at a time (together takes less there; on a CPU, about
    #                    as long: README, Speed)
    spectra_note: str = ""  # c2i, scores not cached: what of the gradient step and SVDs ``seconds`` counts, and how

    def summary(self, rho: str = "ρ") -> str:
        """One line: 'about 9 min (150 to run, …; one full evaluation of this split takes about 4.6 s, from …)'."""
        parts = [f"{self.to_run} to run"] + ([f"{self.cached} in the cache"] if self.cached else []) + \
            ([f"{self.same_ranks} with the same ranks as another {rho}"] if self.same_ranks else [])
        when = "under a second" if self.seconds < 1 else \
            f"{'at most ' if self.upper_bound else ''}about {human_seconds(self.seconds)}"  # not "at most about 0 s"
        return (f"{when} ({', '.join(parts)}; "
                f"one full evaluation of this split takes about {self.full_eval_s:.1f} s, from {self.basis})"
                + ("" if self.scores_cached else f", {self.spectra_note}"))


def block_share(lm: LoadedModel, layer: int | None, reuse: bool) -> float:
    """The share of a full evaluation that a candidate at ``layer`` runs: its layer on with prefix reuse
    (``reuse``: on and applicable, see ``prefix_states.prefix_reuse_applies``), else all of it."""
    if layer is None or not reuse:
        return 1.0
    return (lm.n_layers - layer) / lm.n_layers


def _run_seconds(d: dict) -> float:
    """A timed candidate's seconds less its setup: the SVD of its matrix and the hidden states entering its layer,
    which a search pays once per matrix and per layer (``setup_s``, kept since 2026-11-25). A candidate timed
    before has none to take off: where it was the only one timed at its layer on its split (a sweep of one rho of
    one type: each candidate built its layer's states), its time is about a full evaluation whatever its layer,
    and scaling it by its share of the blocks would count the states twice, so it is no basis at all."""
    return d["seconds"] - d.get("setup_s", 0.0)


def full_eval_seconds(lm: LoadedModel, splits: Splits, split: str, docs: list[dict],
                      reuse: bool, stack: int = 1) -> tuple[float, str, bool] | None:
    """(seconds of one full evaluation of ``split``, where that figure comes from, whether it was timed as the
    search runs its candidates), or None with no timing.

    ``docs``: the cached evaluations of this model on these splits (``candidates.cached_results``); ``reuse``: whether
    their candidates ran with prefix reuse (see :func:`block_share`); ``stack``: how many candidates the search runs
    together (``stacking.stack_size``). A stacked candidate's time is its share of its stack's: where there are
    ``MIN_RUNS`` timed the way the search runs them (stacked or not), those are the basis.
    """
    timed = [d for d in docs if d["split"] == split and d.get("name") and d.get("seconds")
             and not d.get("stopped_early") and d.get("same_as_rho") is None]
    per_layer = Counter(d["layer"] for d in timed)
    timed = [d for d in timed if "setup_s" in d or per_layer[d["layer"]] > 1]  # see _run_seconds
    alike = [d for d in timed if (d.get("stacked", 1) > 1) == (stack > 1)]
    timed = alike if len(alike) >= MIN_RUNS else timed
    if len(timed) >= MIN_RUNS:
        runs = [_run_seconds(d) / block_share(lm, d["layer"], reuse) for d in timed]
        together = sum(d.get("stacked", 1) > 1 for d in timed) * 2 > len(timed)
        return (statistics.median(runs), f"{len(runs)} candidates already timed on this split"
                + (", run together" if together else ""), together == (stack > 1))
    n = len(getattr(splits, split))
    for other in (split, *(s for s in SEARCH_SPLIT.values() if s != split), "test"):  # test: timed on Export/Results
        base = next((d for d in docs if d["split"] == other and not d.get("name") and d.get("seconds")), None)
        if base is not None:
            scale = n / max(1, len(getattr(splits, other)))
            note = "" if other == split else f", scaled to {n} examples"
            return (base["seconds"] * scale, f"the base model's evaluation of the {SPLIT_WORDS[other]} split{note}",
                    stack == 1)
    return None


def _candidates_seconds(lm: LoadedModel, plan: list[Edit | None], full: float, reuse: bool,
                        done: set) -> tuple[float, int, int]:
    """(seconds, cached, same ranks) of a plan's candidates at ``full`` seconds a full evaluation: each not in
    ``done`` (the cache) nor a copy of another rho with the same ranks runs its share of the blocks (None: a
    matrix not known yet, all of them), and each layer edited adds, once per search, the forward up to it that
    builds the hidden states entering it."""
    seconds, cached, same, seen, layers = 0.0, 0, 0, set(), set()
    for edit in plan:
        layer = None  # unknown: a full evaluation
        if edit is not None:
            ident = edit_identity(lm, edit)
            if ident in seen:
                same += 1
                continue
            seen.add(ident)
            if edit in done:
                cached += 1
                continue
            layer = lm.ref(edit.name).layer
            layers.add(layer)
        seconds += full * block_share(lm, layer, reuse)
    return seconds + sum(full * (1 - block_share(lm, layer, reuse)) for layer in layers), cached, same


def full_sweep_unit(lm: LoadedModel, splits: Splits, store: Store) -> tuple[float, str] | None:
    """(seconds of one full evaluation of the validation split, where that comes from) for a LASER sweep with the
    default speed settings (:func:`full_eval_seconds`), the unit of :func:`full_sweep_seconds`; None with no timing."""
    cfg = SearchConfig("laser", ks=(1,))
    found = full_eval_seconds(lm, splits, "val", cached_results(store, lm, splits), prefix_reuse_applies(lm, splits),
                              stack_size(lm, cfg, splits))
    return None if found is None else found[:2]


def full_sweep_seconds(lm: LoadedModel, splits: Splits, rhos, unit: float) -> float:
    """About how long LASER's full sweep of ``rhos`` (every matrix of the model, K=1, on the validation split, with
    the default speed settings) takes here from scratch at ``unit`` seconds a full evaluation of that split
    (:func:`full_sweep_unit`), counting what a search's time counts in the cache's searches table: its candidates,
    with the hidden states they start from. What a C2I search is compared with where no full sweep was run (11 h
    on this CPU for the demo model's 1680 candidates)."""
    reuse, grid = prefix_reuse_applies(lm, splits), tuple(sorted(set(rhos)))
    key = (lm.fingerprint, reuse, grid)
    if key not in _SWEEP_UNITS:  # the same for every unit: worked out once per model, grid and prefix reuse
        plan = [e for e, _ in laser_plan(lm, SearchConfig("laser", ks=(1,), rhos=grid))]
        _SWEEP_UNITS[key] = _candidates_seconds(lm, plan, 1.0, reuse, set())[0]
    return _SWEEP_UNITS[key] * unit


# (model fingerprint, prefix reuse, rho grid) -> full evaluations in LASER's full sweep of that grid: the plan of
# 1680 candidates for the demo took 20 ms a grid, on every rerun of Results for each C2I search listed there
_SWEEP_UNITS: dict[tuple, float] = {}


def estimate_search(lm: LoadedModel, splits: Splits, cfg: SearchConfig, store: Store) -> SearchEstimate | None:
    """About how long ``run_search(lm, splits, cfg, store)`` takes here; None when nothing in the cache is timed.

    Raises:
        ConfigError: the plan itself is invalid (no matrix matches a LASER range, no K of the grid fits the
            chosen matrices).
    """
    split = SEARCH_SPLIT[cfg.method]
    docs = cached_results(store, lm, splits, failed=True)  # an edit that broke the numerics is skipped at once
    reuse = cfg.prefix_reuse and prefix_reuse_applies(lm, splits)
    stack = stack_size(lm, cfg, splits)
    found = full_eval_seconds(lm, splits, split, docs, reuse, stack)
    if found is None:
        return None
    full, basis, as_run = found  # as_run False: timed one at a time for a search that stacks (or the other way)
    needed = spectra_needed(cfg)
    spectra = cached_spectra(lm, splits, store, **needed) if cfg.method == "c2i" else None
    if cfg.method == "laser":
        plan: list[Edit | None] = [e for e, _ in laser_plan(lm, cfg)]
    elif spectra is not None:
        plan = [e for e, _ in c2i_plan(lm, cfg, spectra[0], score_table(lm, spectra[0], cfg.score, cfg))[0]]
    else:
        plan = [None] * (cfg.q * len(cfg.ks) * len(cfg.rhos))  # matrices unknown until the gradient step
    done = {doc_edit(d) for d in docs if d["split"] == split and d.get("name") and not d.get("stopped_early")}
    seconds, cached, same = _candidates_seconds(lm, plan, full, reuse, done)
    if not any(d["split"] == split and not d.get("name") for d in docs):
        seconds += full  # the base model on the searched split, which a search evaluates first
    test = full * len(splits.test) / max(1, len(getattr(splits, split)))
    tested = {doc_edit(d) for d in docs if d["split"] == "test" and not d.get("stopped_early")}  # None: the base
    if None not in tested:
        seconds += test  # the base model on the held-out test split
    planned = {e for e in plan if e is not None} if len(plan) == cached + same else set()
    ran = [d for d in docs if d["split"] == split and doc_edit(d) in planned and not d.get("error")]
    best = max(ran, key=merit, default=None)  # known once every one is cached
    if best is None or doc_edit(best) not in tested:
        seconds += test  # the best candidate on it
    note = ""
    if cfg.method == "c2i" and spectra is None:
        grad, grad_from, svd, svd_from = spectra_time(lm, splits, store, **needed)
        seconds += (grad or 0.0) + (svd or 0.0)
        words = spectra_words(grad, grad_from, svd, svd_from, needed["ks"])
        note = f"including, not cached yet, {words}" if words else \
            "plus the gradient step and the SVDs, not cached yet (neither timed on this model yet)"
    return SearchEstimate(seconds, len(plan), len(plan) - cached - same, cached, same, full, basis,
                          spectra_note=note, scores_cached=cfg.method == "laser" or spectra is not None,
                          upper_bound=cfg.early_stop or (cfg.method == "c2i" and spectra is None)
                          or (stack > 1 and not as_run and lm.device.type in AUTO_STACK))


def spectra_words(grad: float | None, grad_from: str, svd: float | None, svd_from: str, ks) -> str:
    """A gradient step and SVDs still to compute, priced by :func:`~laser_core.scores.spectra_time`'s figures, in
    words: 'the gradient step (about 17 s, as on this calibration split) and the SVDs (about 11 s, as on fever)';
    "" where the gradient step was never timed on the model (then neither were the SVDs)."""
    if grad is None:
        return ""
    step = f"the gradient step (about {human_seconds(grad)}, as on {grad_from})"
    if svd is None:
        return f"{step}; plus the SVDs for K {','.join(map(str, spectra_ks(ks)))}, not timed on this model yet"
    return f"{step} and the SVDs (about {human_seconds(svd)}, as on {svd_from})"


def human_seconds(s: float) -> str:
    """A duration as people say it: 40 s, 9 min, 2.5 h."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
