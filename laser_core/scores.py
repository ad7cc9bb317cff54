"""Scores of every matrix from one calibration gradient (cached), and the candidates each method tries: C2I's
top-q matrices over the K and rho grids, LASER's sweep."""
from __future__ import annotations

import math
import time

import torch

from .config import CONTIGUOUS, Edit, SearchConfig, stable_hash
from .errors import ConfigError
from .evaluate import CancelToken
from .gradients import (GRADIENT_TOKENS, MatrixSpectrum, calibration_gradients, compute_spectra, first_order_gain,
                        gradient_tokens, score_matrices, top_q)
from .models import LoadedModel
from .progress import Progress, emit
from .store import Store
from .tasks import Splits

def spectra_needed(cfg: SearchConfig) -> dict:
    """What of the spectra a C2I search with ``cfg`` scores and plans from, as ``ks`` and ``grouping`` arguments:
    every K of its grid, its rows grouped as it groups them, for ``first_order`` (it scores each (K, rho)); else K=1,
    which every grouping leaves one block."""
    return {"ks": cfg.ks, "grouping": cfg.grouping} if cfg.score == "first_order" else {"ks": (1,)}


def spectra_ks(ks) -> list[int]:
    """The K that spectra for ``ks`` hold: each once, in order, with K=1 (which every score reads) always among them."""
    return sorted(set(ks) | {1})


def _spectra_ident(splits: Splits, ks, grouping: str) -> dict:
    ks = spectra_ks(ks)
    blocks = {"grouping": grouping} if grouping != CONTIGUOUS and max(ks) > 1 else {}  # K = 1: one block, any way
    return {"calib": splits.key("calib"), "ks": ks, **blocks}


def _spectra_key(store: Store, lm: LoadedModel, splits: Splits, ks, grouping: str, kind: str = "spectra") -> str:
    return store.key(kind, lm.fingerprint, splits.task.digest, _spectra_ident(splits, ks, grouping))


SPECTRA_TIME = "spectra_time"  # the key kind of what computing spectra took: a small JSON, listed per model


def _listed_ident(splits: Splits, ks, grouping: str) -> dict:
    """:func:`_spectra_ident` with the grouping always named, as :data:`SPECTRA_TIME` entries list it (the key leaves
    it out where it changes nothing) for :func:`spectra_time` to match."""
    ident = _spectra_ident(splits, ks, grouping)
    return {**ident, "grouping": ident.get("grouping", CONTIGUOUS)}


_CALIB_TOKENS: dict[tuple, int] = {}  # (model, device, calibration split, batch size) -> its gradient_tokens


def _calib_tokens(lm: LoadedModel, splits: Splits) -> int:
    """:func:`~laser_core.gradients.gradient_tokens` of the calibration split, tokenised once per model, device (its
    batches), split and batch size: an estimate asks it on each rerun of Explore or Layer scores until the scores
    are computed (0.2 s on truthful_qa's 100 examples here, each time)."""
    key = (lm.fingerprint, str(lm.device), stable_hash(splits.key("calib")), lm.batch_tokens(GRADIENT_TOKENS))
    if key not in _CALIB_TOKENS:
        _CALIB_TOKENS[key] = gradient_tokens(lm, splits.examples("calib"))
    return _CALIB_TOKENS[key]


def _record_spectra_time(store: Store, lm: LoadedModel, splits: Splits, ks, grouping: str,
                         seconds: list[float]) -> None:
    """Keep what computing these spectra took where :func:`spectra_time` lists it for the model (the spectra's own
    entry is megabytes of tensors: too much to read for a number on every estimate)."""
    store.put_json(_spectra_key(store, lm, splits, ks, grouping, SPECTRA_TIME),
                   {**_listed_ident(splits, ks, grouping), "gradients": seconds[0], "svd": seconds[1],
                    "examples": len(splits.calib), "tokens": _calib_tokens(lm, splits),
                    "task": splits.task.name, "digest": splits.task.digest, "when": time.time()})


def recorded_spectra_time(lm: LoadedModel, splits: Splits, store: Store, ks=(1,),
                          grouping: str = CONTIGUOUS) -> float | None:
    """What computing exactly these spectra (this calibration split, these K and row grouping) took, gradient step
    and SVDs together, as listed when they were computed or last read (None: never timed)."""
    doc = store.get_json(_spectra_key(store, lm, splits, ks, grouping, SPECTRA_TIME))
    return None if doc is None else doc["gradients"] + doc["svd"]


def spectra_time(lm: LoadedModel, splits: Splits, store: Store, ks=(1,),
                 grouping: str = CONTIGUOUS) -> tuple[float | None, str, float | None, str]:
    """About how long :func:`load_spectra` would take here to compute the spectra for these K (and row grouping),
    from what spectra of this model took when computed (the latest of the closest kind): (gradient step seconds,
    where from; SVD seconds, where from), a None where nothing fits.

    The gradient step: this calibration split, else another split or task of this model scaled by the tokens the
    step runs (:func:`~laser_core.gradients.gradient_tokens`; on the demo model, 6.8-7.1 s per thousand on FEVER,
    epistemic_reasoning and qa_wikidata alike, whose 100 examples differ 5-fold in tokens), from the one nearest in
    tokens, else (timed before the tokens were listed) by the number of examples. The SVDs depend on the weights,
    not the task: spectra of the same K and grouping on any task.
    """
    want = _listed_ident(splits, ks, grouping)
    done = [d for _, d in store.iter_json(f"{SPECTRA_TIME}/{lm.fingerprint}/")]
    same = max((d for d in done if d["calib"] == want["calib"]), key=lambda d: d["when"], default=None)  # this task
    grad_s, grad_from = (None, "") if same is None else (same["gradients"], "this calibration split")
    if same is None and done:
        tokens = _calib_tokens(lm, splits) if any("tokens" in d for d in done) else None

        def nearness(d: dict) -> tuple:  # timed with its tokens, nearest in them; then this task's; then the latest
            near = -abs(math.log(max(1, d["tokens"]) / max(1, tokens))) if "tokens" in d else -math.inf
            return near, d["digest"] == splits.task.digest, d["when"]
        grad = max(done, key=nearness)
        where = "another split of this task" if grad["digest"] == splits.task.digest else grad["task"]
        if "tokens" in grad:
            grad_s = grad["gradients"] * tokens / max(1, grad["tokens"])
            grad_from = f"{where}, scaled by tokens: {grad['tokens']:,} there, {tokens:,} here"
        else:
            grad_s = grad["gradients"] * len(splits.calib) / max(1, grad["examples"])
            grad_from = f"{where}, scaled to {len(splits.calib)} examples"
    svd = max((d for d in done if d["ks"] == want["ks"] and d["grouping"] == want["grouping"]),
              key=lambda d: d["when"], default=None)
    svd_from = "" if svd is None else ("this task" if svd["digest"] == splits.task.digest else svd["task"])
    return grad_s, grad_from, None if svd is None else svd["svd"], svd_from


def cached_spectra(lm: LoadedModel, splits: Splits, store: Store, ks=(1,),
                   grouping: str = CONTIGUOUS) -> tuple[dict[str, MatrixSpectrum], float] | None:
    """(spectra, calibration log-loss) from the cache, or None when they were not computed for these K (and row
    grouping) yet."""
    return _spectra_of(lm, store.get_tensors(_spectra_key(store, lm, splits, ks, grouping)), ks)


def _spectra_of(lm: LoadedModel, cached: dict | None, ks) -> tuple[dict[str, MatrixSpectrum], float] | None:
    """:func:`cached_spectra` from the tensors of its cache entry (None: no entry, or one lacking these K)."""
    if cached is None or "loss" not in cached:
        return None
    ks = spectra_ks(ks)
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
                 progress: Progress | None = None, timings: dict | None = None,
                 grouping: str = CONTIGUOUS, spent: dict | None = None) -> tuple[dict[str, MatrixSpectrum], float]:
    """Singular values and their gradients of every matrix, per K (rows grouped into blocks by ``grouping``), for
    the calibration split (cached).

    Returns (spectra by parameter name, calibration log-loss). ``timings`` gets "gradients" and "svd": the seconds
    they took in this call (0 when read from the cache). ``spent`` gets the same two as they took when computed, in
    this call or in the one that cached them (nothing, for spectra cached before their seconds were kept).
    """
    key = _spectra_key(store, lm, splits, ks, grouping)
    cached = store.get_tensors(key)
    found = _spectra_of(lm, cached, ks)
    if found is not None:
        if timings is not None:
            timings.update(gradients=0.0, svd=0.0)
        if "seconds" in cached:
            if spent is not None:
                spent.update(zip(("gradients", "svd"), cached["seconds"].tolist()))
            listed = store.get_json(_spectra_key(store, lm, splits, ks, grouping, SPECTRA_TIME))
            if listed is None or "tokens" not in listed:  # cached before their time, or its tokens, was listed
                _record_spectra_time(store, lm, splits, ks, grouping, cached["seconds"].tolist())
        emit(progress, phase="scores", done=1, total=1, message="scores read from cache")
        return found
    ks = spectra_ks(ks)
    t0 = time.perf_counter()
    emit(progress, phase="gradients", done=0, total=1, message="forward+backward on the calibration split")
    grads, loss = calibration_gradients(
        lm, splits.examples("calib"), cancel,
        lambda d, t: emit(progress, phase="gradients", done=d, total=t, message="forward+backward"))
    t1 = time.perf_counter()
    spectra = compute_spectra(lm, grads, ks, cancel,
                              lambda d, t: emit(progress, phase="svd", done=d, total=t, message="SVD of every matrix"),
                              grouping)
    t2 = time.perf_counter()
    for out in (timings, spent):
        if out is not None:
            out.update(gradients=t1 - t0, svd=t2 - t1)
    flat = {"loss": torch.tensor(loss), "seconds": torch.tensor([t1 - t0, t2 - t1], dtype=torch.float64)}
    for name, sp in spectra.items():
        flat[f"{name}|finite"] = torch.tensor(int(sp.finite))
        for k in sp.S:
            for b in range(len(sp.S[k])):
                flat[f"{name}|S|{k}|{b}"] = sp.S[k][b]
                flat[f"{name}|g|{k}|{b}"] = sp.g[k][b]
    store.put_tensors(key, flat)
    _record_spectra_time(store, lm, splits, ks, grouping, [t1 - t0, t2 - t1])
    return spectra, loss


def score_table(lm: LoadedModel, spectra: dict[str, MatrixSpectrum], score: str, cfg: SearchConfig) -> list[dict]:
    """One row per matrix: layer, type, name, shape, score (NaN for a skipped matrix), rank by score."""
    scores = score_matrices(spectra, score, cfg.tail_fraction, cfg.ks, cfg.rhos)
    order = {n: i for i, (n, _) in enumerate(sorted(((n, s) for n, s in scores.items() if not math.isnan(s)),
                                                    key=lambda t: -t[1]))}
    return [{"layer": r.layer, "type": r.type, "name": r.name, "shape": list(r.shape), "score": scores[r.name],
             "rank": order.get(r.name), "finite": spectra[r.name].finite} for r in lm.matrices]


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
                plan.append((Edit(name, k, rho, cfg.grouping), gain))
    if not plan:  # each matrix once, grouped by its rows, rather than once per K
        rows: dict[int, list[str]] = {}
        for name in dict.fromkeys(u["name"] for u in unfit):
            rows.setdefault(lm.ref(name).shape[0], []).append(name)
        raise ConfigError(f"no K of the grid ({', '.join(map(str, sorted(cfg.ks)))}) fits the chosen matrices, each "
                          "has fewer rows (" + "; ".join(f"{n} rows: {', '.join(names)}" for n, names in rows.items())
                          + f"); add a K of at most {min(rows)}, which fits them all (K=1 fits every matrix)")
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

