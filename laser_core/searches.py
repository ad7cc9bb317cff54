"""The searches in the cache side by side: every complete C2I search and LASER sweep made on a model and a task's
splits (any settings, earlier runs included), with their time, their best edit and that edit's paired held-out change
from the base. The dashboard's Results page shows them as a table, the CLI's ``searches`` prints them."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

from .config import SearchConfig
from .errors import LaserError
from .models import LoadedModel
from .search import report_key
from .significance import change_between, p_text
from .store import Store
from .tasks import Splits


def cached_reports(store: Store, lm: LoadedModel, splits: Splits) -> list[dict]:
    """Every complete search report (``SearchReport.to_dict()``) in the cache made on this model and exactly these
    splits, of any settings: C2I searches and LASER sweeps, earlier runs included (as :func:`~laser_core.candidates.
    cached_results` finds evaluations). A report another version wrote, whose settings no longer load, is left out;
    a C2I report written before its ``spectra_s`` was kept gets the time its spectra took where that is known since.
    """
    from .scores import recorded_spectra_time, spectra_needed
    found = []
    for key, r in store.iter_json(f"report/{lm.fingerprint}/{splits.task.digest}/"):
        try:
            cfg = SearchConfig(**r["config"])
            if r.get("status") != "complete" or key != report_key(store, lm, splits, cfg):
                continue
        except (LaserError, TypeError, KeyError):
            continue
        if r["method"] == "c2i" and r.get("spectra_s") is None:  # a report from before its spectra's time was kept
            r["spectra_s"] = recorded_spectra_time(lm, splits, store, **spectra_needed(cfg))  # the spectra it read
        found.append(r)
    return found


def forget(store: Store, lm: LoadedModel, splits: Splits, config: dict) -> str | None:
    """Take the search of ``config`` (a report's) off the cache's searches: its report is deleted, its candidates'
    results stay (Results and Export show them; running it again lists it again, its evaluations read from the
    cache). Returns None, or why the report was not deleted (the cache folder took no writes, or it had left the
    cache already) for both front ends to say."""
    if store.delete(report_key(store, lm, splits, SearchConfig(**config))):
        return None
    return store.disabled_reason or "it had left the cache"


def settings_text(cfg: dict) -> str:
    """A search's grid in short: 'q=5, K 1,2,4,8, ρ 8 values, 0.005–0.9' (C2I), 'all layers, all types, ρ 0.5, 0.1'
    (LASER); a C2I search's score and row grouping where not the defaults."""
    rhos = cfg["rhos"]
    rho = ", ".join(f"{r:g}" for r in rhos) if len(rhos) <= 4 else f"{len(rhos)} values, {min(rhos):g}–{max(rhos):g}"
    if cfg["method"] == "c2i":
        extra = "".join(f", {cfg[k]}" for k in ("score", "grouping") if cfg.get(k, getattr(SearchConfig, k))
                        != getattr(SearchConfig, k))
        return f"q={cfg['q']}, K {','.join(map(str, cfg['ks']))}, ρ {rho}{extra}"
    layers, types = cfg.get("layers"), cfg.get("types")
    return (f"layers {min(layers)}–{max(layers)}" if layers else "all layers") + \
        f", {'types ' + ','.join(types) if types else 'all types'}, ρ {rho}"


FullSweep = Callable[[Sequence[float]], "tuple[float, float, str] | None"]  # rho grid -> (seconds, unit, basis)


def full_sweep_of(lm: LoadedModel, splits: Splits, store: Store) -> FullSweep:
    """The estimated time of LASER's full sweep of a rho grid on this model and these splits, with the unit of the
    estimate and where it comes from (:func:`~laser_core.estimate.full_sweep_seconds`), or None with no timing: what
    :func:`search_rows` compares each C2I search with where no full LASER sweep was run. The unit is read from the
    cache once, each grid's sweep priced once."""
    from .estimate import full_sweep_seconds, full_sweep_unit

    @functools.cache
    def unit() -> tuple[float, str] | None:
        return full_sweep_unit(lm, splits, store)

    @functools.cache
    def of(rhos: tuple) -> tuple[float, float, str] | None:
        return None if unit() is None else (full_sweep_seconds(lm, splits, rhos, unit()[0]), *unit())
    return lambda rhos: of(tuple(sorted(set(rhos))))


def search_rows(reports: list[dict], full_sweep: FullSweep | None = None) -> list[dict]:
    """One row per report, C2I searches first, each method's fastest first: ``method``, ``settings``,
    ``candidates``, ``time_s`` (the time the search takes from scratch, as its parts took when they ran: its
    candidates' evaluations, a rerun from the cache keeping the first run's times, and for C2I the gradient step and
    SVDs behind its scores), ``spectra_s`` (C2I: that gradient step and SVDs; None where they were not recorded, and
    ``time_s`` is then its candidates' alone), ``less_than_laser`` (C2I: the time of the sweep :func:`basis_sweep`
    picks over this one's; None without a sweep), ``less_than_full_laser`` (C2I, with ``full_sweep``
    (:func:`full_sweep_of`): the estimated time of LASER's full sweep of this search's rho grid over this one's;
    None without a timing to estimate from), ``best`` (the report's best candidate, or None), ``split``,
    ``best_on_split``, ``accuracy`` and ``log_loss`` (the best on held-out test), ``change`` (its ``PairedChange``
    from the base on the same questions, or None) and the report's ``config``."""
    timed = [(sum(c.get("seconds") or 0.0 for c in r["candidates"]) + (r.get("spectra_s") or 0.0), r)
             for r in reports]
    rows = []
    for seconds, r in sorted(timed, key=lambda t: (t[1]["method"] != "c2i", t[0])):
        best, test = r.get("best"), r.get("best_test") or {}
        rows.append({"method": "C2I" if r["method"] == "c2i" else "LASER", "settings": settings_text(r["config"]),
                     "candidates": len(r["candidates"]), "time_s": seconds, "spectra_s": r.get("spectra_s"),
                     "less_than_laser": None, "less_than_full_laser": None, "best": best, "split": r["search_split"],
                     "best_on_split": (best or {}).get("accuracy"), "accuracy": test.get("accuracy"),
                     "log_loss": test.get("log_loss"), "change": change_between(r.get("base_test"), r.get("best_test")),
                     "config": r["config"]})
    sweep = basis_sweep(rows)
    for r in rows:
        if r["method"] != "C2I" or not r["time_s"]:
            continue
        if sweep is not None:
            r["less_than_laser"] = rows[sweep]["time_s"] / r["time_s"]
        if full_sweep is not None and (full := full_sweep(r["config"]["rhos"])) is not None:
            r["less_than_full_laser"] = full[0] / r["time_s"]
    return rows


def basis_sweep(rows: list[dict]) -> int | None:
    """The index in ``rows`` of the LASER sweep that C2I searches are compared with: the one of most candidates
    (of those, the fastest), the nearest the cache holds to LASER's full sweep; None without a sweep."""
    return max((i for i, r in enumerate(rows) if r["method"] == "LASER"), key=lambda i: rows[i]["candidates"],
               default=None)


def beside_laser(rows: list[dict]) -> bool:
    """Do :func:`search_rows` compare a C2I search with a LASER sweep (a ``less_than_laser`` to show)?"""
    return any(r["less_than_laser"] is not None for r in rows)


def beside_laser_text(rows: list[dict]) -> str:
    """What the "x less than LASER" of :func:`search_rows` is, in words ('the time of LASER sweep #14 (…) … over
    each C2I search's …'), naming that sweep by its number in the table; "" where nothing is compared. A sweep of
    only some layers or types, or of another rho grid, is not LASER's full sweep of a C2I search's grid: the ratio
    is between the two as they ran, nothing scaled (``less_than_full_laser`` is the estimate of the full sweep)."""
    if not beside_laser(rows):
        return ""
    i = basis_sweep(rows)
    r = rows[i]
    return (f"the time of LASER sweep #{i + 1} ({r['settings']}; {r['candidates']} candidates, "
            f"{r['time_s']:.1f} s), the largest in the cache, over each C2I search's, both as they ran")


def full_sweep_text(rows: list[dict], full_sweep: FullSweep | None) -> str:
    """What the "x less than full LASER (est.)" of :func:`search_rows` is, in words, with the unit of the
    estimate and where it comes from; "" where no row has one."""
    r = next((r for r in rows if r["less_than_full_laser"] is not None), None)
    if r is None or full_sweep is None:
        return ""
    _, unit, basis = full_sweep(r["config"]["rhos"])
    return ("the time LASER's sweep of every matrix (all layers and types, K=1, on the validation split) over the "
            "C2I search's ρ grid would take here, estimated from the cache's timings as Explore estimates a run "
            f"(one full evaluation of that split about {unit:.1f} s, from {basis}), over the C2I search's time")


def time_text(row: dict) -> str:
    """A :func:`search_rows` row's time as the CLI prints it: a C2I search's says what its gradient step and SVDs
    took, or that they were not recorded (spectra cached by an earlier version: the time is its candidates' alone)."""
    if row["method"] != "C2I":
        return f"{row['time_s']:.1f}"
    spectra = row["spectra_s"]
    return f"{row['time_s']:.1f} (" + ("gradient + SVD not recorded)" if spectra is None else
                                       f"of which gradient + SVD {spectra:.1f})")


def searches_markdown(rows: list[dict]) -> str:
    """:func:`search_rows` as a markdown table (the CLI's ``searches``), numbered from 1 as on the dashboard (what
    ``searches --forget N`` takes), edits as the report prints them
    (:func:`~laser_core.report_table.edit_text`); the "x less than LASER" column only :func:`beside_laser`."""
    from .report_table import edit_text

    def num(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)
    laser = beside_laser(rows)
    full = any(r["less_than_full_laser"] is not None for r in rows)
    header = ["#", "method", "settings", "candidates", "time (s)", *["x less than LASER"] * laser,
              *["x less than full LASER (est.)"] * full, "best", "best on its split", "held-out",
              "change from the base (95% CI, p)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows):
        c = r["change"]
        cells = [str(i + 1), r["method"], r["settings"], str(r["candidates"]), time_text(r),
                 *[num(r["less_than_laser"], ".1f")] * laser, *[num(r["less_than_full_laser"], ".1f")] * full,
                 edit_text(r["best"]) if r["best"] else "–",
                 f"{num(r['best_on_split'], '.3f')} ({r['split']})", num(r["accuracy"], ".3f"),
                 f"{c.change:+.3f} ({c.low:+.3f} to {c.high:+.3f}, {p_text(c.p_value)})" if c else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
