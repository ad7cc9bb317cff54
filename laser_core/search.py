"""Scores, the C2I search and the LASER brute-force baseline, on one evaluator and one cache."""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .config import Edit, SearchConfig, TaskSpec, to_dict
from .errors import Cancelled, ConfigError, NumericsError, TaskFormatError
from .evaluate import CancelToken, EvalResult, PrefixStates, evaluate
from .prefix import block_list
from .gradients import MatrixSpectrum, calibration_gradients, compute_spectra, first_order_gain, score_matrices, top_q
from .models import LoadedModel, MatrixRef, matrix_of
from .reduction import BlockFactors, block_ranks, block_svd, edited
from .significance import PairedChange, change_between
from .store import FACTORS, Store, null_store
from .tasks import Splits

log = logging.getLogger(__name__)
Progress = Callable[[dict], None]
SEARCH_SPLIT = {"c2i": "calib", "laser": "val"}  # where each method scores its candidates (LASER: its 20% validation)


def _emit(progress: Progress | None, **event) -> None:
    if progress:
        progress(event)


# ---------------------------------------------------------------- scores

def _spectra_key(store: Store, lm: LoadedModel, splits: Splits, ks) -> str:
    return store.key("spectra", lm.fingerprint, splits.task.digest,
                     {"calib": splits.key("calib"), "ks": sorted(set(ks) | {1})})


def cached_spectra(lm: LoadedModel, splits: Splits, store: Store,
                   ks=(1,)) -> tuple[dict[str, MatrixSpectrum], float] | None:
    """(spectra, calibration log-loss) from the cache, or None when they were not computed for these K yet."""
    ks = sorted(set(ks) | {1})
    cached = store.get_tensors(_spectra_key(store, lm, splits, ks))
    if cached is None or "loss" not in cached:
        return None
    spectra = {}
    for r in lm.matrices:
        kk = [k for k in ks if k <= r.shape[0]]
        try:
            S = {k: [cached[f"{r.name}|S|{k}|{b}"] for b in range(k)] for k in kk}
            g = {k: [cached[f"{r.name}|g|{k}|{b}"] for b in range(k)] for k in kk}
        except KeyError:
            return None
        spectra[r.name] = MatrixSpectrum(r, S, g, bool(cached[f"{r.name}|finite"].item()))
    return spectra, float(cached["loss"].item())


def load_spectra(lm: LoadedModel, splits: Splits, store: Store, ks=(1,), cancel: CancelToken | None = None,
                 progress: Progress | None = None, timings: dict | None = None) -> tuple[dict[str, MatrixSpectrum], float]:
    """Singular values and their gradients of every matrix, per K, for the calibration split (cached).

    Returns (spectra by parameter name, calibration log-loss). ``timings`` gets "gradients" and "svd" seconds.
    """
    found = cached_spectra(lm, splits, store, ks)
    if found is not None:
        if timings is not None:
            timings.update(gradients=0.0, svd=0.0)
        _emit(progress, phase="scores", done=1, total=1, message="scores read from cache")
        return found
    ks = sorted(set(ks) | {1})
    t0 = time.perf_counter()
    _emit(progress, phase="gradients", done=0, total=1, message="forward+backward on the calibration split")
    grads, loss = calibration_gradients(
        lm, splits.examples("calib"), cancel,
        lambda d, t: _emit(progress, phase="gradients", done=d, total=t, message="forward+backward"))
    t1 = time.perf_counter()
    spectra = compute_spectra(lm, grads, ks, cancel,
                              lambda d, t: _emit(progress, phase="svd", done=d, total=t, message="SVD of every matrix"))
    t2 = time.perf_counter()
    if timings is not None:
        timings.update(gradients=t1 - t0, svd=t2 - t1)
    flat = {"loss": torch.tensor(loss)}
    for name, sp in spectra.items():
        flat[f"{name}|finite"] = torch.tensor(int(sp.finite))
        for k in sp.S:
            for b in range(len(sp.S[k])):
                flat[f"{name}|S|{k}|{b}"] = sp.S[k][b]
                flat[f"{name}|g|{k}|{b}"] = sp.g[k][b]
    store.put_tensors(_spectra_key(store, lm, splits, ks), flat)
    return spectra, loss


def score_table(lm: LoadedModel, spectra: dict[str, MatrixSpectrum], score: str, cfg: SearchConfig) -> list[dict]:
    """One row per matrix: layer, type, name, shape, score (NaN for a skipped matrix), rank by score."""
    scores = score_matrices(spectra, score, cfg.tail_fraction, cfg.ks, cfg.rhos)
    order = {n: i for i, (n, _) in enumerate(sorted(((n, s) for n, s in scores.items() if not math.isnan(s)),
                                                    key=lambda t: -t[1]))}
    return [{"layer": r.layer, "type": r.type, "name": r.name, "shape": list(r.shape), "score": scores[r.name],
             "rank": order.get(r.name), "finite": spectra[r.name].finite} for r in lm.matrices]


# ---------------------------------------------------------------- candidates

def params_kept(ref: MatrixRef, k: int, rho: float) -> tuple[list[int], int]:
    """(rank kept per block, parameters of the factored form) of a (K, rho) reduction of ``ref``."""
    from .reduction import row_blocks

    ranks = block_ranks(ref.shape, k, rho)
    blocks = row_blocks(ref.shape[0], k)
    return ranks, sum(r * ((b - a) + ref.shape[1]) for r, (a, b) in zip(ranks, blocks))


def get_factors(lm: LoadedModel, name: str, k: int, store: Store, memo: dict | None = None) -> BlockFactors:
    """Block-SVD factors of matrix ``name`` for K blocks, on the model's device: one SVD per (matrix, K) serves
    every rho (cached in ``store``).

    ``memo`` (a dict a search passes to every candidate) keeps the last (matrix, K)'s factors in memory, so
    that the candidates of one matrix's rho grid neither read them back from the store one by one nor, where
    the store caches nothing (``--no-cache``, the benchmark), compute the SVD again.
    """
    if memo is not None and (name, k) in memo:
        return memo[(name, k)]
    key = store.key(FACTORS, lm.fingerprint, "-", {"name": name, "k": k})  # FACTORS: the store's bounded part
    t = store.get_tensors(key)
    if t is not None:
        f = BlockFactors.from_tensors(t).to(lm.device)
    else:
        store.counts["svd"] += 1
        f = block_svd(matrix_of(dict(lm.model.named_parameters())[name], lm.ref(name)), k)
        store.put_tensors(key, f.tensors())
    if memo is not None:
        memo.clear()  # searches go matrix by matrix and K by K: one entry is all they reuse
        memo[(name, k)] = f
    return f


def prefix_reuse_applies(lm: LoadedModel, splits: Splits) -> bool:
    """Can candidates on ``splits`` start from cached hidden states? Only where the model's blocks are found and
    the task is scored by forward passes (generation decodes with its own cache)."""
    return block_list(lm) is not None and splits.task.kind == "mc"


class PrefixPool:
    """Hidden states entering each edited layer (and, per edited matrix, the outputs of its block's modules that
    run before it), per split, kept in RAM up to ``budget_bytes`` (LRU by layer).

    Built from the unedited model under its lock; valid for one model's base weights only.
    """

    def __init__(self, lm: LoadedModel, budget_bytes: int) -> None:
        self.lm, self.budget = lm, budget_bytes
        self.items: OrderedDict[tuple[str, int], PrefixStates] = OrderedDict()

    def get(self, splits: Splits, split: str, layer: int, matrix: str | None = None) -> PrefixStates | None:
        """States entering block ``layer`` for ``split``; with ``matrix``, also what of that block precedes it."""
        if (layer == 0 and matrix is None) or not prefix_reuse_applies(self.lm, splits):
            return None  # nothing to skip
        key = (split, layer)
        if key in self.items:
            self.items.move_to_end(key)
        else:
            with self.lm.lock:
                self.items[key] = PrefixStates(self.lm, splits.examples(split), layer)
        states = self.items[key]
        if matrix is not None:
            with self.lm.lock:  # the outputs a matrix adds must fit beside this layer's states
                states = states.at_matrix(self.lm, matrix, max_bytes=self.budget - states.nbytes)
        while len(self.items) > 1 and sum(p.nbytes for p in self.items.values()) > self.budget:
            self.items.popitem(last=False)
        return states


def _match_ident(splits: Splits) -> dict:
    """The answer-match rule of a generation task for cache keys, where it is not LASER's (the default): results
    scored by LASER's rule keep the keys they had before there was a choice."""
    return {"match": splits.spec.match} if splits.task.kind == "gen" and splits.spec.match != TaskSpec.match else {}


def report_task(splits: Splits) -> dict:
    """The task of a search report: where it came from, its examples' digest and the seeded split sizes that
    decide which examples each split holds, and, for a generation task, its decoding length and a match rule
    other than LASER's (every result depends on those)."""
    out = {"source": splits.spec.source, "name": splits.task.name, "digest": splits.task.digest,
           "seed": splits.spec.seed, "n_calib": len(splits.calib), "n_val": len(splits.val), "n_test": len(splits.test)}
    if splits.task.kind == "gen":
        out.update(max_new_tokens=splits.spec.max_new_tokens, **_match_ident(splits))
    return out


def evaluate_split(lm: LoadedModel, splits: Splits, split: str, **kw) -> EvalResult:
    """:func:`~laser_core.evaluate.evaluate` on the examples of ``split``, with the task's decoding settings (its
    length and answer-match rule), which every result of the task is keyed by."""
    return evaluate(lm, splits.examples(split), splits.spec.max_new_tokens, match=splits.spec.match, **kw)


def _split_ident(splits: Splits, split: str) -> dict:
    """What every evaluation of ``split`` depends on besides the model and edits, for cache keys: the exact
    examples, the decoding length and, for a generation task, an answer-match rule other than LASER's."""
    return {"split": splits.key(split), "max_new_tokens": splits.spec.max_new_tokens, **_match_ident(splits)}


def result_key(store: Store, lm: LoadedModel, splits: Splits, split: str, edit: Edit | None) -> str:
    """Cache key of one evaluation: model weights, task, the exact examples of ``split``, edit, decoding length
    and, for a generation task, the answer-match rule."""
    ident = {**_split_ident(splits, split), "edit": to_dict(edit) if edit else None}
    return store.key("result", lm.fingerprint, splits.task.digest, ident)


def report_key(store: Store, lm: LoadedModel, splits: Splits, cfg: SearchConfig, status: str = "complete") -> str:
    """Cache key of a search report: model, task, the searched split's examples, the settings, its status, and for
    a generation task the decoding length and answer-match rule (every result in it depends on those)."""
    split = SEARCH_SPLIT[cfg.method]
    ident = {"cfg": to_dict(cfg), "split": splits.key(split), "status": status}
    if splits.task.kind == "gen":  # a multiple-choice report's key stays as it was: its results decode nothing
        ident.update(max_new_tokens=splits.spec.max_new_tokens, **_match_ident(splits))
    return store.key("report", lm.fingerprint, splits.task.digest, ident)


def doc_edit(doc: dict) -> Edit | None:
    """The edit an evaluation (a cached result or a report's row) is of; None for the base model."""
    return Edit(doc["name"], int(doc["k"]), float(doc["rho"])) if doc.get("name") else None


def cached_results(store: Store, lm: LoadedModel, splits: Splits) -> list[dict]:
    """Every evaluation of this model on exactly these splits found in the cache (earlier runs included).

    Entries made on other splits of the same task (another seed or size) are left out: their keys differ.
    """
    out = []
    for key, doc in store.iter_json(f"result/{lm.fingerprint}/{splits.task.digest}/"):
        if doc.get("split") not in ("calib", "val", "test"):
            continue
        if key == result_key(store, lm, splits, doc["split"], doc_edit(doc)):
            out.append(doc)
    return out


def evaluate_candidate(lm: LoadedModel, edit: Edit | None, splits: Splits, split: str, store: Store,
                       cancel: CancelToken | None = None, beat: tuple[float, float] | None = None,
                       prefixes: PrefixPool | None = None, factors: dict | None = None) -> dict:
    """Evaluate the model with ``edit`` (None = base) on ``split``; cached per (model, task split, edit).

    ``factors``: a search's in-memory memo of SVD factors (see :func:`get_factors`).

    Returns a plain dict: the edit, its layer/type/ranks, accuracy, log_loss, per-example outcomes, seconds.
    """
    key = result_key(store, lm, splits, split, edit)
    doc = store.get_json(key)
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
        ref = lm.ref(edit.name)
        store.counts["eval"] += 1
        f = get_factors(lm, edit.name, edit.k, store, factors)
        prefix = prefixes.get(splits, split, ref.layer, edit.name) if prefixes is not None else None
        with edited(lm, [edit], {(edit.name, edit.k): f}):
            res = evaluate_split(lm, splits, split, cancel=cancel, beat=beat, prefix=prefix)
        ranks, kept = params_kept(ref, edit.k, edit.rho)
        row = {"name": edit.name, "layer": ref.layer, "type": ref.type, "k": edit.k, "rho": edit.rho,
               "ranks": ranks, "params_kept": kept, "params_full": ref.shape[0] * ref.shape[1]}
    doc = {**row, "split": split, "task": splits.task.name, **res.to_dict(), "seconds": time.perf_counter() - t0}
    if res.stopped_early:
        doc["stopped_below"] = beat[0]  # it could not reach this accuracy (nor, then, any higher one)
    store.put_json(key, doc)
    doc["cached"] = False
    return doc


def edits_key(store: Store, lm: LoadedModel, splits: Splits, split: str, edits: list[Edit]) -> str:
    """Cache key of an evaluation of ``edits`` applied together: :func:`result_key` for one edit or none; for
    several, their set (edits of distinct matrices each reduce the base weights, so their order does not matter)
    under its own kind, which :func:`cached_results` (single edits, what a search compares) does not list."""
    if len(edits) <= 1:
        return result_key(store, lm, splits, split, edits[0] if edits else None)
    ident = {**_split_ident(splits, split), "edits": sorted((e.name, e.k, e.rho) for e in edits)}
    return store.key("together", lm.fingerprint, splits.task.digest, ident)


def cached_edits(store: Store, lm: LoadedModel, splits: Splits, split: str, edits: list[Edit]) -> dict | None:
    """The cached evaluation of ``edits`` applied together on ``split`` (see :func:`evaluate_edits`); None when not
    computed yet, or only up to an early stop, whose accuracy counts only the examples it saw."""
    doc = store.get_json(edits_key(store, lm, splits, split, edits))
    return None if doc is None or doc.get("stopped_early") else doc


def cached_combinations(store: Store, lm: LoadedModel, splits: Splits) -> list[dict]:
    """Every evaluation of several edits applied together (:func:`evaluate_edits`) of this model on exactly these
    splits found in the cache: the dashboard's combinations and recipe checks, ``eval --recipe``'s."""
    return [doc for key, doc in store.iter_json(f"together/{lm.fingerprint}/{splits.task.digest}/")
            if doc.get("split") in ("calib", "val", "test") and isinstance(doc.get("edits"), list)
            and key == edits_key(store, lm, splits, doc["split"], [Edit(**e) for e in doc["edits"]])]


def evaluate_edits(lm: LoadedModel, edits: list[Edit], splits: Splits, split: str, store: Store,
                   cancel: CancelToken | None = None) -> dict:
    """Evaluate the model with all of ``edits`` at once (a recipe's, a combination's) on ``split``, cached: one
    edit (or none) goes through :func:`evaluate_candidate`; several are evaluated together and cached under
    :func:`edits_key`, and the result's ``edits`` lists them. Before, several edits were re-evaluated on every
    ask (the dashboard's combination and recipe check, ``eval --recipe``)."""
    if len(edits) <= 1:
        return evaluate_candidate(lm, edits[0] if edits else None, splits, split, store, cancel)
    key = edits_key(store, lm, splits, split, edits)
    doc = store.get_json(key)
    if doc is not None:
        doc["cached"] = True
        return doc
    t0 = time.perf_counter()
    with edited(lm, edits):
        res = evaluate_split(lm, splits, split, cancel=cancel)
    doc = {"name": None, "edits": [asdict(e) for e in edits], "split": split, "task": splits.task.name,
           **res.to_dict(), "seconds": time.perf_counter() - t0}
    store.put_json(key, doc)
    doc["cached"] = False
    return doc


def edit_identity(lm: LoadedModel, edit: Edit) -> tuple:
    """What an edit does to the weights: two rhos that keep the same rank in every block are one edit."""
    return edit.name, edit.k, tuple(block_ranks(lm.ref(edit.name).shape, edit.k, edit.rho))


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


def _better(a: dict, b: dict | None) -> bool:
    """Is result ``a`` better than ``b`` (see :func:`merit`)."""
    return b is None or merit(a) > merit(b)


# ---------------------------------------------------------------- reports

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

    @property
    def improves(self) -> bool:
        return self.best is not None and _better(self.best, self.base)

    def best_edit(self) -> Edit | None:
        return Edit(self.best["name"], self.best["k"], self.best["rho"]) if self.best else None

    def held_out_change(self) -> PairedChange | None:
        """Base vs best on the held-out test questions, paired (None without both evaluations)."""
        return change_between(self.base_test, self.best_test)

    def to_dict(self) -> dict:
        return asdict(self)


def _slim(doc: dict | None) -> dict | None:
    return None if doc is None else {k: v for k, v in doc.items() if k not in ("correct", "predictions")}


def c2i_matrices(matrices: list[dict], q: int) -> list[str]:
    """Names of the top-``q`` of the ``score_table`` rows ``matrices``, best first: the ones a C2I search tries."""
    return top_q({m["name"]: m["score"] for m in matrices}, q)


def c2i_plan(lm: LoadedModel, cfg: SearchConfig, spectra: dict[str, MatrixSpectrum],
             matrices: list[dict]) -> tuple[list[tuple[Edit, float | None]], list[dict]]:
    """C2I's candidates in search order, and the (matrix, K) pairs left out.

    The candidates: the top-``q`` matrices of the ``score_table`` rows ``matrices``, each over the K and rho grids,
    with the first-order predicted gain where the spectra hold that K (else None). A K larger than a chosen
    matrix's rows is left out for that matrix: one entry per such pair, in the form of a report's ``skipped``.

    Raises:
        ConfigError: no K of the grid fits any chosen matrix (nothing would be tried).
    """
    plan: list[tuple[Edit, float | None]] = []
    unfit: list[dict] = []
    for name in c2i_matrices(matrices, cfg.q):
        ref = lm.ref(name)
        rows = ref.shape[0]
        for k in cfg.ks:
            if k > rows:
                unfit.append({"name": name, "layer": ref.layer, "type": ref.type, "k": k, "rho": None,
                              "error": f"K={k} is larger than its {rows} rows: not tried (K <= {rows} fits it)"})
                continue
            for rho in cfg.rhos:
                gain = first_order_gain(spectra[name], k, rho) if k in spectra[name].S else None
                plan.append((Edit(name, k, rho), gain))
    if not plan:
        raise ConfigError("no K of the grid fits the chosen matrices (" + "; ".join(map(skip_text, unfit))
                          + "); add a smaller K: K=1 fits every matrix")
    return plan, unfit


def skip_text(entry: dict) -> str:
    """One line for a report's ``skipped`` entry: which matrix (and K, rho) and why."""
    what = " ".join([entry["name"]] + [f"{key}={entry[key]:g}" if key == "rho" else f"K={entry[key]}"
                                       for key in ("k", "rho") if entry.get(key) is not None])
    return f"{what}: {entry['error']}"


def laser_plan(lm: LoadedModel, cfg: SearchConfig) -> list[tuple[Edit, None]]:
    """LASER's candidates in sweep order: every matrix of ``cfg.layers`` x ``cfg.types`` x rho, K=1.

    Raises:
        ConfigError: no matrix matches the layers and types.
    """
    refs = [r for r in lm.matrices
            if (cfg.layers is None or r.layer in cfg.layers) and (cfg.types is None or r.type in cfg.types)]
    if not refs:
        raise ConfigError(f"no matrices match layers={cfg.layers} types={cfg.types}; "
                          f"the model has layers 0-{lm.matrices[-1].layer} and types "
                          f"{sorted({r.type for r in lm.matrices})}")
    return [(Edit(r.name, 1, rho), None) for r in refs for rho in cfg.rhos]


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
    try:
        base = evaluate_candidate(lm, None, splits, split, store, cancel)
        _emit(progress, phase="base", done=1, total=1, message=f"base accuracy {base['accuracy']:.3f}", base=_slim(base))
        if method == "c2i":
            spectra, _ = load_spectra(lm, splits, store, cfg.ks if cfg.score == "first_order" else (1,),
                                      cancel, progress, timings)
            t0 = time.perf_counter()
            matrices = score_table(lm, spectra, cfg.score, cfg)
            plan, unfit = c2i_plan(lm, cfg, spectra, matrices)
            skipped += unfit
            timings["scores"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prefixes = PrefixPool(lm, cfg.prefix_budget_mb * 2**20) if cfg.prefix_reuse else None
        done_ranks: dict[tuple, dict] = {}  # (matrix, K, ranks) -> its result: another rho, the same edit
        for i, (edit, gain) in enumerate(plan):
            if cancel:
                cancel.check()
            beat = (best["accuracy"], best["log_loss"]) if (cfg.early_stop and best) else None
            ident = edit_identity(lm, edit)
            same = done_ranks.get(ident)
            try:
                doc = same_result(lm, edit, splits, split, store, same) if same else \
                    evaluate_candidate(lm, edit, splits, split, store, cancel, beat, prefixes, factors)
            except NumericsError as e:  # this edit broke the model's numerics: report it, skip it
                log.warning("candidate %s K=%d rho=%g skipped: %s", edit.name, edit.k, edit.rho, e)
                ref = lm.ref(edit.name)
                skipped.append({"name": edit.name, "layer": ref.layer, "type": ref.type, "k": edit.k,
                                "rho": edit.rho, "error": str(e)})
                _emit(progress, phase="search", done=i + 1, total=len(plan), message=f"skipped: {e}")
                continue
            doc["predicted_gain"] = gain
            done_ranks.setdefault(ident, doc)
            candidates.append(doc)
            if not doc.get("stopped_early") and _better(doc, best):
                best = doc
            _emit(progress, phase="search", done=i + 1, total=len(plan), row=_slim(doc),
                  message=f"{edit.name} K={edit.k} rho={edit.rho}: acc {doc['accuracy']:.3f}")
        timings["search"] = time.perf_counter() - t0
    except Cancelled:
        status = "partial"
        log.info("search cancelled after %d candidates", len(candidates))
    base_test = best_test = None
    if status == "complete" and held_out:
        t0 = time.perf_counter()
        _emit(progress, phase="test", done=0, total=2, message="held-out test: base and best")
        base_test = evaluate_candidate(lm, None, splits, "test", store, cancel)
        if best is not None:
            best_test = evaluate_candidate(lm, Edit(best["name"], best["k"], best["rho"]), splits, "test", store, cancel,
                                           factors=factors)
        timings["test"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    counts = {k: store.counts.get(k, 0) - counts0.get(k, 0) for k in set(store.counts) | set(counts0)}
    report = SearchReport(
        method=method, config=to_dict(cfg), model={"source": lm.spec.source, "fingerprint": lm.fingerprint,
                                                    **{k: v for k, v in lm.facts().items() if k != "fingerprint"}},
        task=report_task(splits),
        search_split=split, base=_slim(base), best=_slim(best), base_test=base_test, best_test=best_test,
        candidates=[_slim(c) for c in candidates], matrices=matrices, timings=timings, cache=counts, status=status,
        skipped=skipped + [{"name": m["name"], "layer": m["layer"], "type": m["type"],
                            "error": "NaN/inf gradient: matrix not scored"} for m in matrices if not m["finite"]])
    if held_out or status != "complete":  # a complete report lacking its held-out results is not one to reuse
        store.put_json(report_key(store, lm, splits, cfg, status), report.to_dict())
    return report
