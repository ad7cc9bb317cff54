"""``python -m laser_core``: scores, search (C2I), laser (baseline), eval, apply, compose and report."""
from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import sys
from pathlib import Path

from .cli_args import parser, recipe_path, search_config_of, spec_args, specs_of
from .cli_report import cmd_report
from .config import ModelSpec, SearchConfig
from .errors import Cancelled, ConfigError, LaserError
from .memory import memory_explained
from .progress import Bars


def _setup(args):
    from .models import load_model
    from .store import Store, null_store
    from .tasks import load_task, make_splits

    store = null_store() if args.no_cache else Store(Path(args.cache_dir) if args.cache_dir else None)
    if store.disabled_reason and not args.no_cache:
        print(f"note: {store.disabled_reason}", file=sys.stderr)
    mspec, tspec = specs_of(args)
    splits = make_splits(load_task(tspec), tspec)  # first: a bad task fails in seconds, not after a model load
    lm = load_model(mspec, progress=lambda m: print(m, file=sys.stderr))
    return lm, tspec, splits, store


def _fmt(d: dict | None) -> str:
    return "n/a" if d is None else f"accuracy {d['accuracy']:.3f}  log-loss {d['log_loss']:.4f}  (n={d['n']})"


def _cmd_scores(args) -> int:
    from .scores import load_spectra, score_table, spectra_needed

    cfg = SearchConfig(score=args.score, tail_fraction=args.tail_fraction)
    lm, tspec, splits, store = _setup(args)
    timings, spent = {}, {}
    bars = Bars()
    spectra, loss = load_spectra(lm, splits, store, progress=bars, timings=timings, spent=spent, **spectra_needed(cfg))
    bars.close()
    rows = sorted([r for r in score_table(lm, spectra, args.score, cfg) if r["rank"] is not None], key=lambda r: r["rank"])
    print(f"calibration log-loss {loss:.4f} on {len(splits.calib)} examples; score '{args.score}' "
          f"(g_i = dL/dsigma_i > 0 pushes sigma_i toward zero)")
    print(f"{'rank':>4}  {'layer':>5}  {'type':<6} {'score':>12}  name")
    for r in rows[:args.top]:
        print(f"{r['rank'] + 1:>4}  {r['layer']:>5}  {r['type']:<6} {r['score']:>12.5g}  {r['name']}")
    skipped = [r["name"] for r in score_table(lm, spectra, args.score, cfg) if not r["finite"]]
    if skipped:
        print(f"skipped (NaN/inf gradient): {', '.join(skipped)}")
    first = f"; they took {spent['gradients']:.1f} s and {spent['svd']:.1f} s when computed" if spent else ""
    print(f"time: gradients {timings['gradients']:.1f} s, svd {timings['svd']:.1f} s"
          + (f"  (read from cache{first})" if timings["gradients"] == 0 else ""))
    return 0


@contextlib.contextmanager
def _interruptible():
    """(cancel token, progress bars) for a long library call: Ctrl-C sets the token, so the call stops where it
    can and keeps what is done; the bars are closed and the previous Ctrl-C handler put back on exit."""
    from .evaluate import CancelToken

    cancel, bars = CancelToken(), Bars()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.cancel())
    try:
        yield cancel, bars
    finally:
        bars.close()
        signal.signal(signal.SIGINT, previous)


def _cmd_search(args, method: str) -> int:
    from .answers import answer_rule_words
    from .estimate import SPLIT_WORDS, estimate_search
    from .recipe import recipe_from_report
    from .saving import check_out_file, save_json, save_recipe
    from .scores import skip_text
    from .search import SEARCH_SPLIT, run_search, time_summary

    cfg = search_config_of(args, method)  # settings are checked before the (slow) model load
    for out in filter(None, (args.recipe_out, args.report_out)):
        check_out_file(out)  # before the (slow) model load
    lm, tspec, splits, store = _setup(args)
    est = estimate_search(lm, splits, cfg, store)
    if est is not None and est.to_run:
        print(f"estimated run time: {est.summary('rho')}; Ctrl-C stops it and keeps what is done", file=sys.stderr)
    with _interruptible() as (cancel, bars):
        report = run_search(lm, splits, cfg, store, progress=bars, cancel=cancel)
    split = SPLIT_WORDS[SEARCH_SPLIT[method]]
    rule = answer_rule_words(splits.task, tspec.match)  # "" for multiple choice
    print(f"{method.upper()} on {splits.task.name}: {len(report.candidates)} candidates on the {split} split "
          f"({len(getattr(splits, report.search_split))} examples), held-out test {len(splits.test)} examples, seed {tspec.seed}"
          + (f", {tspec.shots}-shot" if tspec.shots else "")
          + (f"; {rule}" if rule else ""))
    for who, where, doc in (("base", split, report.base), ("best", split, report.best),
                            ("base", "held-out", report.base_test), ("best", "held-out", report.best_test)):
        print(f"{who}   {where:<11} {_fmt(doc)}")
    change = report.held_out_change()
    if change is not None:
        print(f"held-out change {change.summary()}")
    for entry in report.skipped:
        print(f"skipped: {skip_text(entry)}")
    if args.report_out:
        print(f"report: {save_json(report.to_dict(), args.report_out)}")
    if report.status != "complete":
        print(f"cancelled: {len(report.candidates)} candidate{'s' * (len(report.candidates) != 1)} kept in the cache; "
              "no test evaluation")
        return 130
    b = report.best
    if b is None:
        print("no candidate finished (each was skipped, see above): no edit to export", file=sys.stderr)
        return 1
    rows = f" ({b['grouping']} rows)" if b.get("grouping") else ""
    print(f"chosen edit: {b['name']} (layer {b['layer']}, {b['type']}) K={b['k']} rho={b['rho']}{rows} ranks={b['ranks']}"
          + ("" if report.improves else "  [does not beat the base model on the search split]"))
    print("time: " + time_summary(report.to_dict()))
    if store.disabled_reason and not args.no_cache:
        print(f"note: {store.disabled_reason}")
    recipe = recipe_from_report(lm, report, tspec)
    path = recipe_path(args, splits.task.name, method, cfg.grouping, lm.fingerprint)
    print(f"recipe: {save_recipe(recipe, path)}\nwhat it does to the other bundled tasks: python -m laser_core eval "
          f"--recipe {shlex.quote(str(path))} {shlex.join(spec_args(lm.spec, tspec))} --other-tasks")
    if args.compose or args.compose_max:
        return _compose_after(args, lm, tspec, splits, store, report, path)
    return 0


def _compose_after(args, lm, tspec, splits, store, report, best_path: Path) -> int:
    """``search --compose``: greedy composition from the search's best (``laser_core.compose``), printed, and its
    recipe written beside the best's."""
    from .prefix_states import prefix_reuse_applies
    from .compose import compose_greedy, compose_pool, composition_estimate
    from .estimate import SPLIT_WORDS
    from .recipe import make_recipe, recipe_metrics
    from .saving import save_recipe
    from .significance import change_between

    split = SPLIT_WORDS[report.search_split]
    pool = compose_pool(report.candidates, report.best, report.base)
    to_try = pool[:args.compose_max]
    tries = len(to_try)
    each = (report.base or {}).get("seconds")  # one full evaluation of the split, as the base's took
    reuse = not args.no_prefix_reuse and prefix_reuse_applies(lm, splits)
    about = f", {composition_estimate(lm, to_try, report.best, each, reuse)}" if each and tries else ""
    capped = f"{tries} of {len(pool)} edits to try (--compose-max {args.compose_max}; " if tries < len(pool) else \
        f"{tries} edit{'s' * (tries != 1)} to try ("
    print(f"compose: {capped}each other matrix's best that beats the base alone on the {split} split, best first{about}"
          "), each kept where the edits together score better there; Ctrl-C stops it and keeps what is done")
    try:
        with _interruptible() as (cancel, bars):
            comp = compose_greedy(lm, splits, report.best, report.candidates, store, report.base, cancel=cancel,
                                  progress=bars, limit=args.compose_max,
                                  prefix_budget_mb=args.prefix_budget_mb if not args.no_prefix_reuse else None)
    except Cancelled:
        print("cancelled: the edits evaluated together are kept in the cache; no composed recipe")
        return 130
    for st in comp.steps:
        together = f"not kept: {st['error']}" if st.get("error") else \
            f"together {st['accuracy']:.3f} log-loss {st['log_loss']:.4f}  {'kept' if st['kept'] else 'not kept'}"
        print(f"  + {st['name']} K={st['k']} rho={st['rho']} (alone {st['alone']:.3f}): {together}")
    if comp.left:
        print(f"  ({comp.left} more not tried: a larger --compose-max tries them)")
    if not comp.added:
        print("compose: no edit added to the best one; no composed recipe")
        return 0
    print(f"composed {split:<9} {_fmt(comp.result)}  ({len(comp.edits)} edits)")
    print(f"composed held-out {_fmt(comp.result_test)}")
    change = comp.held_out_change()
    if change is not None:
        print(f"held-out change of the composition {change.summary()}")
    over = change_between(report.best_test, comp.result_test)
    if over is not None:
        print(f"held-out change from the best edit alone {over.summary()}")
    recipe = make_recipe(lm, comp.edits, tspec, recipe_metrics(report.search_split, report.base, comp.result,
                                                               comp.base_test, comp.result_test), "composed")
    suffix = f"-composed-max{args.compose_max}" if comp.left else "-composed"  # a capped run keeps a full one's
    print(f"composed recipe: {save_recipe(recipe, best_path.with_name(best_path.stem + suffix + best_path.suffix))}")
    return 0


def _cmd_searches(args) -> int:
    from .searches import (beside_laser_text, cached_reports, forget, full_sweep_of, full_sweep_text, search_rows,
                           searches_markdown)
    if args.no_cache:  # before the model load
        raise ConfigError("searches lists what the cache holds: run it without --no-cache")
    lm, tspec, splits, store = _setup(args)
    rows = search_rows(cached_reports(store, lm, splits), full := full_sweep_of(lm, splits, store))
    sizes = (f"calibration {len(splits.calib)}, validation {len(splits.val)}, held-out test {len(splits.test)}, "
             f"seed {tspec.seed}")
    if args.forget is not None:
        if args.forget > len(rows):
            raise ConfigError(f"no search {args.forget}: the cache holds {len(rows)} for this model on "
                              f"{splits.task.name} ({sizes}); run searches without --forget to list them")
        gone = rows[args.forget - 1]
        if why := forget(store, lm, splits, gone["config"]):
            raise ConfigError(f"search {args.forget} was not deleted: {why}")
        print(f"forgot search {args.forget}: {gone['method']} · {gone['settings']} (its {gone['candidates']} "
              "candidates' results stay in the cache: running it again lists it again, in seconds)")
        rows = search_rows(cached_reports(store, lm, splits), full)  # a sweep forgotten is compared with no more
    if not rows:
        print(f"no search in the cache for this model on {splits.task.name} ({sizes}): run search or laser first")
        return 0
    print(f"{len(rows)} search{'es' * (len(rows) != 1)} in the cache for this model on {splits.task.name} ({sizes}):")
    print(searches_markdown(rows))
    notes = {"x less than LASER": beside_laser_text(rows),
             "x less than full LASER (est.)": full_sweep_text(rows, full)}
    print("time: what each search takes from scratch, as its parts took when they ran (a rerun from the cache keeps "
          "them): its candidates' evaluations and, for C2I, the gradient step and SVDs behind its scores"
          + "".join(f"; {name}: {text}" for name, text in notes.items() if text))
    return 0


def _cmd_eval(args) -> int:
    from .answers import answer_rule_words
    from .candidates import evaluate_edits
    from .other_tasks import effects_lines, other_task_effects, other_task_specs, other_task_splits
    from .recipe import check_recipe_fits, load_recipe
    from .significance import change_between

    recipe = load_recipe(args.recipe) if args.recipe else None  # a bad recipe fails in seconds, not after a model load
    if args.other_tasks is not None and not recipe:
        raise ConfigError("--other-tasks compares the base model with a recipe's edits: give --recipe too")
    names = None if args.other_tasks in (None, "all") else args.other_tasks.split(",")
    others, left_out = ([], []) if args.other_tasks is None else other_task_splits(
        other_task_specs(specs_of(args)[1], names))
    lm, tspec, splits, store = _setup(args)
    edits = check_recipe_fits(lm, recipe) if recipe else []
    doc = evaluate_edits(lm, edits, splits, args.split, store)
    rule = answer_rule_words(splits.task, tspec.match)  # "" for multiple choice
    print(f"{args.split}: {_fmt(doc)}" + ("  (cached)" if doc.get("cached") else "") + (f"  ({rule})" if rule else ""))
    if recipe and args.split == "test":  # held out: a fair comparison with the base model (see significance)
        base = evaluate_edits(lm, [], splits, "test", store)
        print(f"base: {_fmt(base)}" + ("  (cached)" if base.get("cached") else ""))
        change = change_between(base, doc)
        if change is not None:
            print(f"held-out change {change.summary()}")
    if others:
        with _interruptible() as (cancel, bars):
            rows = other_task_effects(lm, edits, others, store, cancel=cancel, progress=bars)
        print("on other tasks, held-out test, base -> with the recipe:\n  " + "\n  ".join(
            effects_lines(rows) + [f"left out, too small for these sizes: {why}" for why in left_out]))
    return 0


def _cmd_apply(args) -> int:
    from .recipe import apply_recipe, load_recipe

    recipe = load_recipe(args.recipe)
    m = recipe["model"]  # where --model or --device is given: the recipe's model spec with them in its place
    spec = ModelSpec(args.model or m["source"], args.device or m.get("device", "auto"), m.get("dtype", "float32")) \
        if args.model or args.device else None
    res = apply_recipe(recipe, args.out, spec, overwrite=args.overwrite, force=args.force, check=not args.no_check,
                       progress=lambda m: print(m, file=sys.stderr))
    c = res["check"]
    if c:
        exp = c["expected"]
        print(f"edited held-out accuracy {c['accuracy']:.3f} (recipe says "
              f"{'n/a' if exp is None else format(exp['accuracy'], '.3f')}): {'OK' if c['matches'] else 'MISMATCH'}")
    print(f"saved edited model to {res['out']}")
    return 0 if (c is None or c["matches"]) else 1


def _cmd_compose(args) -> int:
    from .recipe import compose_recipes, load_recipe, recipe_model, recipe_task
    from .saving import save_recipe

    recipe = compose_recipes([load_recipe(r) for r in args.recipes], args.recipes)
    path = save_recipe(recipe, args.out)
    task, model = recipe_task(recipe), recipe_model(recipe)
    flags = spec_args(model, task) if task else ["--model", model.source, "--task", "<task>"]
    print(f"recipe: {path} ({len(recipe['edits'])} edits from {len(args.recipes)} recipes"
          + ("" if task else "; they name no task in common") + ")")
    print(f"evaluate the edits together: python -m laser_core eval --recipe {path} {shlex.join(flags)} --split test")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code. User errors print one line and return 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    args = parser().parse_args(argv)
    try:
        commands = {"scores": _cmd_scores, "search": lambda a: _cmd_search(a, "c2i"), "eval": _cmd_eval,
                    "laser": lambda a: _cmd_search(a, "laser"), "report": cmd_report, "compose": _cmd_compose,
                    "searches": _cmd_searches}
        with memory_explained(f"in {args.cmd}", search=args.cmd in ("search", "laser", "report")):
            return commands.get(args.cmd, _cmd_apply)(args)
    except LaserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a search's own Ctrl-C handling (a model load, a report, an apply)
        print("interrupted: stopped here; no partial model or recipe was written", file=sys.stderr)
        return 130
