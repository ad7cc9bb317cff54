"""How much prefix reuse saves a greedy composition (a measurement, not a test)

  python bench/compose_speed.py --model demo --task fever --method laser --types down --rhos 0.1

Runs (or, where the cache holds it, reads back) the search, then composes edits greedily from its best on its split
twice, on a cache-less store so that every try runs: with prefix reuse (the states entering the lowest layer of the
edits kept, shared by every try at or above it) and without. Prints each run's time, their ratio, where each try
started, and whether both runs gave the same accuracy and log-loss at every step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from laser_core import ModelSpec, SearchConfig, Store, TaskSpec, load_model, load_task, make_splits  # noqa: E402
from laser_core.compose import compose_greedy, compose_pool  # noqa: E402
from laser_core.search import run_search  # noqa: E402
from laser_core.store import null_store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--task", default="fever")
    ap.add_argument("--method", default="laser", choices=("laser", "c2i"))
    ap.add_argument("--types", default="down", help="laser: matrix types swept, comma-separated (empty: all)")
    ap.add_argument("--rhos", default="0.1")
    ap.add_argument("--limit", type=int, default=None, help="edits to try at most (default: the whole pool)")
    args = ap.parse_args()
    lm = load_model(ModelSpec(args.model))
    ts = TaskSpec(args.task)
    splits = make_splits(load_task(ts), ts)
    rhos = tuple(float(x) for x in args.rhos.split(","))
    cfg = SearchConfig("laser", ks=(1,), rhos=rhos, types=tuple(t for t in args.types.split(",") if t) or None) \
        if args.method == "laser" else SearchConfig(rhos=rhos)
    t0 = time.perf_counter()
    rep = run_search(lm, splits, cfg, Store(), held_out=False)
    pool = compose_pool(rep.candidates, rep.best, rep.base)[:args.limit]
    low = rep.best["layer"]
    print(f"{args.model} on {args.task}: {args.method} search ({time.perf_counter() - t0:.0f} s, from the cache where "
          f"it held it); composition from {rep.best['name']} K={rep.best['k']} rho={rep.best['rho']} on the "
          f"{rep.search_split} split ({len(splits.examples(rep.search_split))} examples), {len(pool)} tries at layers "
          f"{[c['layer'] for c in pool]} ({sum(c['layer'] >= low for c in pool)} at or above layer {low})\n")
    runs = {}
    for label, budget in (("prefix reuse", SearchConfig.prefix_budget_mb), ("every block", None)):
        t0 = time.perf_counter()
        comp = compose_greedy(lm, splits, rep.best, rep.candidates, null_store(), rep.base, held_out=False,
                              limit=args.limit, prefix_budget_mb=budget)
        runs[label] = (time.perf_counter() - t0, [(s["name"], s["accuracy"], s["log_loss"], s["kept"])
                                                  for s in comp.steps])
        print(f"{label}: {runs[label][0]:.1f} s", flush=True)
    (fast, a), (slow, b) = runs["prefix reuse"], runs["every block"]
    same = len(a) == len(b) and all(x[0] == y[0] and x[1] == y[1] and x[3] == y[3] and abs(x[2] - y[2]) < 1e-4
                                    for x, y in zip(a, b))
    print(f"\nratio (prefix reuse / every block): {fast / slow:.2f}; same accuracy, log-loss (1e-4) and choice at "
          f"every step: {same}")
    Path(__file__).parent.joinpath("results").mkdir(exist_ok=True)
    Path(__file__).parent.joinpath("results", f"compose_speed-{args.task}.json").write_text(json.dumps(
        {"seconds": {k: v[0] for k, v in runs.items()}, "steps": {k: v[1] for k, v in runs.items()}, "same": same},
        indent=2))


if __name__ == "__main__":
    main()
