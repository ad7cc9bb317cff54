"""The C2I search and the LASER brute-force baseline, on one evaluator and one cache, and their reports."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

from .candidates import better, edit_identity, evaluate_candidate, making_room, match_ident, same_result
from .config import Edit, SearchConfig, to_dict
from .errors import Cancelled, ConfigError, NumericsError, TaskFormatError
from .evaluate import CancelToken
from .models import LoadedModel
from .prefix_states import PrefixPool
from .progress import Progress, emit
from .scores import c2i_plan, laser_plan, load_spectra, score_table, spectra_needed
from .significance import PairedChange, change_between
from .stacking import stack_ahead, stack_size
from .store import Store, null_store
from .tasks import Splits

log = logging.getLogger(__name__)
SEARCH_SPLIT = {"c2i": "calib", "laser": "val"}  # where each method scores its candidates (LASER: its 20% validation)
# settings that change how fast a search runs and how much memory it takes, never what it finds: every candidate's
# result is cached under a key without them, so a search's report is the same whatever they are
SPEED_ONLY = ("prefix_reuse", "prefix_budget_mb", "stack")
PHASES = ("gradients", "svd", "scores", "search", "test", "total")  # a report's timings, in the order they run


def report_task(splits: Splits) -> dict:
    """The task of a search report: where it came from, its examples' digest and the seeded split sizes that
    decide which examples each split holds, and, for a generation task, its decoding length and a match rule
    other than LASER's (every result depends on those)."""
    out = {"source": splits.spec.source, "name": splits.task.name, "digest": splits.task.digest,
           "seed": splits.spec.seed, "n_calib": len(splits.calib), "n_val": len(splits.val), "n_test": len(splits.test)}
    if splits.task.kind == "gen":
        out.update(max_new_tokens=splits.spec.max_new_tokens, **match_ident(splits))
    return out


def report_key(store: Store, lm: LoadedModel, splits: Splits, cfg: SearchConfig, status: str = "complete") -> str:
    """Cache key of a search report: model, task, the searched split's examples, the settings that change what it
    finds (:func:`search_identity`), its status, and for
    a generation task the decoding length and answer-match rule (every result in it depends on those)."""
    split = SEARCH_SPLIT[cfg.method]
    ident = {"cfg": search_identity(cfg), "split": splits.key(split), "status": status}
    if splits.task.kind == "gen":  # a multiple-choice report's key stays as it was: its results decode nothing
        ident.update(max_new_tokens=splits.spec.max_new_tokens, **match_ident(splits))
    return store.key("report", lm.fingerprint, splits.task.digest, ident)


def search_identity(cfg: SearchConfig) -> dict:
    """What of ``cfg`` a search's report depends on, for its cache key: the settings with those of
    :data:`SPEED_ONLY` at their defaults. A search run with another stack size, prefix budget or without prefix reuse
    (the CLI's flags, the dashboard's Speed settings) finds the report of the same search with the defaults, and
    the other way round; a report made with the defaults keeps the key it had before."""
    return to_dict(replace(cfg, **{name: getattr(SearchConfig, name) for name in SPEED_ONLY}))


@dataclass
class SearchReport:
    """Everything a search produced: base and best on the searched split and on held-out test."""

    method: str
    config: dict
    model: dict
    task: dict
    search_split: str
    base: dict
    best: dict | None
    base_test: dict | None
    best_test: dict | None
    candidates: list[dict] = field(default_factory=list)
    matrices: list[dict] = field(default_factory=list)  # score table (c2i)
    timings: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    status: str = "complete"  # or "partial" (cancelled)
    skipped: list[dict] = field(default_factory=list)  # candidates or matrices left out, with the reason
    states: dict = field(default_factory=dict)  # the most prefix reuse's cached states held at once (peak_held)
    spectra_s: float | None = None  # c2i: what the gradient step and SVDs behind its scores took when they were
    # computed, here or by the run that cached them (None: a sweep, or spectra cached before this was kept)

    @property
    def improves(self) -> bool:
        return self.best is not None and better(self.best, self.base)

    def best_edit(self) -> Edit | None:
        return Edit.of(self.best) if self.best else None

    def held_out_change(self) -> PairedChange | None:
        """Base vs best on the held-out test questions, paired (None without both evaluations)."""
        return change_between(self.base_test, self.best_test)

    def to_dict(self) -> dict:
        return asdict(self)


def time_summary(report: dict, rho: str = "rho") -> str:
    """Where a search's time went and what it took from the cache, in one line (the CLI's ``time:`` line, the
    dashboard's caption), from its report (``SearchReport.to_dict()``): each phase, the scores and candidates read
    from the cache (with what they took when computed) and those not re-run, and, where prefix reuse cached hidden
    states, the most they held at once."""
    cands, states, t = report.get("candidates", []), report.get("states") or {}, report.get("timings", {})
    cached = [c for c in cands if c.get("cached") and "same_as_rho" not in c]
    took = sum(c.get("seconds") or 0 for c in cached)  # when they ran (a report cached as JSON has its keys sorted)
    same = sum(1 for c in cands if "same_as_rho" in c)
    spectra = report.get("spectra_s")  # C2I: its scores' gradient step and SVDs, when they were computed
    read = spectra and t.get("gradients", 0.0) + t.get("svd", 0.0) < spectra / 2
    return (", ".join(f"{k} {t[k]:.1f} s" for k in sorted(t, key=lambda k: PHASES.index(k) if k in PHASES else 99))
            + (f"; scores read from cache (their gradient step and SVDs took {spectra:.1f} s when computed)"
               if read else "")
            + f"; candidates from cache {len(cached)}/{len(cands)}"
            + (f" (their evaluations took {took:.1f} s when they ran)" if took else "")
            + (f"; {same} not re-run (same ranks as another {rho})" if same else "")
            + (f"; cached states up to {states['mb']:g} MB on {states['device']} ({states['layers']} "
               f"layer{'s' * (states['layers'] != 1)} at once)" if states else ""))


def _slim(doc: dict | None) -> dict | None:
    return None if doc is None else {k: v for k, v in doc.items() if k not in ("correct", "predictions")}


def run_search(lm: LoadedModel, splits: Splits, cfg: SearchConfig, store: Store | None = None,
               progress: Progress | None = None, cancel: CancelToken | None = None,
               held_out: bool = True) -> SearchReport:
    """Run a C2I search (``cfg.method == "c2i"``) or a LASER sweep (``"laser"``) and report it.

    C2I: score every matrix from one calibration gradient, take the top ``q``, evaluate each (K, rho) on the
    calibration split. LASER: every chosen layer x type x rho, K=1, on the validation split. Either way the
    best (accuracy, then log-loss) and the base are then evaluated on the held-out test split.

    Progress events are dicts with ``phase``, ``done``, ``total``, ``message`` and, for candidates, ``row``.
    A cancel returns what was done with ``status="partial"``; the weights are always restored.
    ``held_out=False`` leaves the test split alone (``base_test`` and ``best_test`` None), for a caller that
    evaluates it itself (the paper table evaluates the base once for all methods); such a report is not cached,
    since the dashboard and CLI reuse a complete report with its held-out results.
    """
    store = store or null_store()
    counts0 = dict(store.counts)
    t_start = time.perf_counter()
    timings: dict = {}
    spent: dict = {}  # the spectra's seconds when computed (see load_spectra)
    method = cfg.method
    split = SEARCH_SPLIT[method]
    if not getattr(splits, split):
        raise TaskFormatError(f"task {splits.task.name!r} has no examples left for a validation split; "
                              "lower n_calib or n_test, or use the c2i method")
    if method == "c2i" and cfg.q > len(lm.matrices):
        raise ConfigError(f"q={cfg.q} is larger than the model's {len(lm.matrices)} matrices")
    plan = laser_plan(lm, cfg) if method == "laser" else []  # a range that matches nothing: before any evaluation
    most = max(r.shape[0] for r in lm.matrices)
    if method == "c2i" and max(cfg.ks) > most:  # no matrix could take it: say so before the gradient step
        raise ConfigError(f"K={max(cfg.ks)} is larger than the rows of every matrix of this model (at most {most}); "
                          f"use K <= {most}")
    base = best = None
    candidates: list[dict] = []
    factors: dict = {}  # the last (matrix, K)'s SVD factors, for the rest of its rho grid
    skipped: list[dict] = []
    matrices: list[dict] = []
    status = "complete"
    prefixes = None
    try:
        emit(progress, phase="base", done=0, total=1, message=f"base model on the {split} split")
        base = evaluate_candidate(lm, None, splits, split, store, cancel)
        emit(progress, phase="base", done=1, total=1, message=f"base accuracy {base['accuracy']:.3f}", base=_slim(base))
        if method == "c2i":
            spectra, _ = load_spectra(lm, splits, store, cancel=cancel, progress=progress, timings=timings,
                                      spent=spent, **spectra_needed(cfg))
            t0 = time.perf_counter()
            matrices = score_table(lm, spectra, cfg.score, cfg)
            plan, unfit = c2i_plan(lm, cfg, spectra, matrices)
            skipped += unfit
            timings["scores"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prefixes = PrefixPool(lm, cfg.prefix_budget_mb * 2**20) if cfg.prefix_reuse else None
        done_ranks: dict[tuple, dict] = {}  # (matrix, K, ranks) -> its result: another rho, the same edit
        stack = stack_size(lm, cfg, splits)
        ready: dict = {}  # results of candidates evaluated together ahead of their turn (see laser_core.stacking)
        alone: set[tuple] = set()  # (matrix, K, grouping) left with nothing to stack: not looked through again
        for i, (edit, gain) in enumerate(plan):
            if cancel and edit not in ready:  # what a stack evaluated before a cancel is reported (and cached)
                cancel.check()
            beat = (best["accuracy"], best["log_loss"]) if (cfg.early_stop and best) else None
            ident = edit_identity(lm, edit)
            same = done_ranks.get(ident)
            if edit not in ready and not same:  # what runs now (a candidate, or a stack from it) takes a while
                emit(progress, phase="search", done=i, total=len(plan), message=f"evaluating {edit.label}")
            if stack > 1 and not same and edit not in ready and edit.blocks not in alone:
                ahead, stack = making_room(lm, prefixes, f"preparing the stack of {edit.label}", lambda: (
                    stack_ahead(lm, plan, i, stack, splits, split, store, set(done_ranks), cancel, prefixes, factors)))
                ready.update(ahead)
                if not ahead:  # fewer than two of its candidates to run from here on: none later either
                    alone.add(edit.blocks)
            try:
                doc = ready.pop(edit, None)
                if isinstance(doc, NumericsError):
                    raise doc
                doc = doc or (same_result(lm, edit, splits, split, store, same) if same else
                              making_room(lm, prefixes, f"evaluating {edit.label}", lambda: evaluate_candidate(
                                  lm, edit, splits, split, store, cancel, beat, prefixes, factors)))
            except NumericsError as e:  # this edit broke the model's numerics: report it, skip it
                log.warning("candidate %s K=%d rho=%g skipped: %s", edit.name, edit.k, edit.rho, e)
                ref = lm.ref(edit.name)
                skipped.append({"name": edit.name, "layer": ref.layer, "type": ref.type, "k": edit.k,
                                "rho": edit.rho, "error": str(e)})
                emit(progress, phase="search", done=i + 1, total=len(plan), message=f"skipped: {e}")
                continue
            doc["predicted_gain"] = gain
            done_ranks.setdefault(ident, doc)
            candidates.append(doc)
            if not doc.get("stopped_early") and better(doc, best):
                best = doc
            emit(progress, phase="search", done=i + 1, total=len(plan), row=_slim(doc),
                  message=f"{edit.label}: acc {doc['accuracy']:.3f}")
        timings["search"] = time.perf_counter() - t0
    except Cancelled:
        status = "partial"
        log.info("search cancelled after %d candidates", len(candidates))
    base_test = best_test = None
    if status == "complete" and held_out:
        t0 = time.perf_counter()
        emit(progress, phase="test", done=0, total=2, message="held-out test: base and best")
        base_test = evaluate_candidate(lm, None, splits, "test", store, cancel)
        if best is not None:
            best_test = evaluate_candidate(lm, Edit.of(best), splits, "test", store, cancel, factors=factors)
        timings["test"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    counts = {k: store.counts.get(k, 0) - counts0.get(k, 0) for k in set(store.counts) | set(counts0)}
    report = SearchReport(
        method=method, config=to_dict(cfg), model={"source": lm.spec.source, "fingerprint": lm.fingerprint,
                                                    **{k: v for k, v in lm.facts().items() if k != "fingerprint"}},
        task=report_task(splits),
        search_split=split, base=_slim(base), best=_slim(best), base_test=base_test, best_test=best_test,
        candidates=[_slim(c) for c in candidates], matrices=matrices, timings=timings, cache=counts, status=status,
        states=prefixes.peak_held() if prefixes is not None else {}, spectra_s=sum(spent.values()) if spent else None,
        skipped=skipped + [{"name": m["name"], "layer": m["layer"], "type": m["type"],
                            "error": "NaN/inf gradient: matrix not scored"} for m in matrices if not m["finite"]])
    if held_out or status != "complete":  # a complete report lacking its held-out results is not one to reuse
        store.put_json(report_key(store, lm, splits, cfg, status), report.to_dict())
    return report

