"""Speed benchmark (not a test): prints a markdown table and writes JSON.

  python bench/speed.py                # embedded demo model, FEVER, LASER over every layer
  python bench/speed.py --quick        # LASER measured on --laser-layers only, the rest extrapolated

(a) per-candidate evaluation time, full forward vs prefix reuse, at the first and middle layer and at every
    layer of the last quarter, for an edit of each matrix type there;
(b) end to end: C2I (gradient + scores + q x K x rho search on the calibration split) vs LASER brute force
    (layers x matrix types x the same rho grid, K=1, on the 20% validation split), wall time and held-out
    test accuracy of each best candidate;
(c) revisiting a cached candidate, and an SVD read from the cache vs recomputed;
(d) the physical limit: the floating-point operations one evaluation executes (counted by torch's
    FlopCounterMode) over its time in (a), against this machine's matmul throughput at the model's own shapes.
Every ratio comes from timings taken in this one run. Nothing is cached between (a), (b) and (c) except
where (c) measures the cache itself.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from laser_core import Edit, ModelSpec, SearchConfig, Store, TaskSpec, edited, load_model, load_task, make_splits, run_search  # noqa: E402
from laser_core.candidates import evaluate_candidate  # noqa: E402
from laser_core.evaluate import evaluate  # noqa: E402
from laser_core.prefix_states import PrefixStates  # noqa: E402
from laser_core.reduction import block_svd, get_factors  # noqa: E402
from laser_core.report import laser_baseline  # noqa: E402
from laser_core.stacking import stack_size  # noqa: E402
from laser_core.store import null_store  # noqa: E402


def sync(lm) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def timed(lm, fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(lm)
        t0 = time.perf_counter()
        out = fn()
        sync(lm)
        best = min(best, time.perf_counter() - t0)
    return best, out


def part_a(lm, splits, repeat: int) -> list[dict]:
    """Per layer: the full forward under an edit there, and the prefix path for an edit of each matrix type."""
    n_layers = lm.n_layers
    layers = sorted({0, n_layers // 2, *last_quarter(n_layers)})
    ex = splits.examples("calib")
    rows = []
    for layer in layers:
        refs = [r for r in lm.matrices if r.layer == layer]
        t_build, prefix = timed(lm, lambda: PrefixStates(lm, ex, layer))

        def full_forward(times: int):  # costs the same whichever matrix is edited
            with edited(lm, [Edit(refs[0].name, 1, 0.1)]):
                return timed(lm, lambda: evaluate(lm, ex), times)

        # the full forward is timed before and after the prefix timings (best of all), so that a slow stretch of
        # the machine during the layer's measurements weighs on both sides of its ratio
        t_full, full = full_forward(-(-repeat // 2))
        per_type = {}
        for ref in refs:
            t_entry, entry = timed(lm, lambda: prefix.at_matrix(lm, ref.name))
            with edited(lm, [Edit(ref.name, 1, 0.1)]):
                t_pref, fast = timed(lm, lambda: evaluate(lm, ex, prefix=entry), repeat)
            if ref is refs[0]:
                assert abs(full.log_loss - fast.log_loss) < 1e-4 and full.predictions == fast.predictions
            per_type[ref.type] = {"matrix": ref.name, "prefix_s": t_pref,
                                  "entry_build_s": t_entry, "skips": sorted(entry.stubs[0]) if entry.stubs else []}
        if repeat > 1:
            t_full = min(t_full, full_forward(repeat // 2)[0])
        for v in per_type.values():
            v["ratio"] = v["prefix_s"] / t_full
        ratios = [v["ratio"] for v in per_type.values()]
        rows.append({"layer": layer, "full_s": t_full, "prefix_s": sum(v["prefix_s"] for v in per_type.values()) / len(refs),
                     "ratio": sum(ratios) / len(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "floor": (n_layers - layer) / n_layers, "prefix_build_s": t_build,
                     "prefix_mb": prefix.nbytes / 2**20, "types": per_type})
    return rows


def last_quarter(n_layers: int) -> list[int]:
    return list(range(min(-(-3 * n_layers // 4), n_layers - 1), n_layers))  # from ceil(3L/4); the last layer at least


def summary_a(rows: list[dict], n_layers: int) -> dict:
    """Mean ratio at the first, middle and last layer (the issue's three), and over the last quarter; the worst
    last-quarter matrix type."""
    by = {r["layer"]: r["ratio"] for r in rows}
    three = [by[0], by[n_layers // 2], by[n_layers - 1]]
    lastq = [by[layer] for layer in last_quarter(n_layers)]
    worst = max(((r["layer"], t, v["ratio"]) for r in rows if r["layer"] in last_quarter(n_layers)
                 for t, v in r["types"].items()), key=lambda x: x[2])
    return {"mean_first_middle_last": sum(three) / 3, "last_quarter_mean": sum(lastq) / len(lastq),
            "last_quarter_worst": max(lastq), "last_quarter_worst_layer": max(last_quarter(n_layers), key=by.get),
            "worst_type_layer": worst[0], "worst_type": worst[1], "worst_type_ratio": worst[2]}


def part_b(lm, splits, args, a: list[dict]) -> dict:
    rhos = tuple(args.rhos)
    t0 = time.perf_counter()
    cfg = SearchConfig("c2i", q=args.q, ks=tuple(args.ks), rhos=rhos, stack=args.stack)
    c2i = run_search(lm, splits, cfg, null_store())
    c2i_time = time.perf_counter() - t0 - c2i.timings.get("test", 0.0)  # search cost only, as for LASER
    laser = laser_baseline(lm, splits, rhos, tuple(args.laser_layers) if args.quick else None, stack=args.stack)
    # where the ratio comes from: how many (candidate, example) evaluations each method made, and what one cost
    c2i_evals = sum("same_as_rho" not in c for c in c2i.candidates) * len(splits.calib)
    laser_evals = laser.candidates_distinct * len(splits.val)
    why = {"c2i_candidate_examples": c2i_evals, "laser_candidate_examples": laser_evals,
           "fewer_candidate_examples": laser_evals / c2i_evals,
           "c2i_ms_per_candidate_example": 1000 * c2i.timings["search"] / c2i_evals,
           "laser_ms_per_candidate_example": 1000 * laser.seconds / laser_evals,
           "c2i_fixed_s": c2i_time - c2i.timings["search"],
           "c2i_layers": sorted({c["layer"] for c in c2i.candidates})}
    # context for the ratio: both methods as if every pair ran the full forward of (a)
    full_ms = 1000 * sum(r["full_s"] for r in a) / len(a) / len(splits.calib)
    why.update({"full_forward_ms_per_example": full_ms, "no_prefix_laser_s": laser_evals * full_ms / 1000,
                "no_prefix_c2i_s": c2i_evals * full_ms / 1000 + why["c2i_fixed_s"]})
    return {"c2i_s": c2i_time, "c2i_candidates": len(c2i.candidates), "c2i_timings": c2i.timings, "why": why,
            "c2i_best": c2i.best, "c2i_base_test": c2i.base_test["accuracy"], "c2i_best_test": c2i.best_test["accuracy"],
            "laser_s": laser.seconds, "laser_measured_s": laser.measured_seconds,
            "laser_candidates_measured": len(laser.report.candidates), "laser_candidates_total": laser.candidates_total,
            "laser_best": laser.report.best, "laser_best_test": laser.report.best_test["accuracy"],
            "speedup": laser.seconds / c2i_time, "note": laser.note, "stack": stack_size(lm, cfg, splits),
            "n_calib": len(splits.calib), "n_val": len(splits.val), "n_test": len(splits.test)}


def part_c(lm, splits) -> dict:
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        ref = next(r for r in lm.matrices if r.type in ("up", "qkv"))
        edit = Edit(ref.name, 1, 0.1)
        evaluate_candidate(lm, edit, splits, "calib", store)
        t_revisit = min(timed(lm, lambda: evaluate_candidate(lm, edit, splits, "calib", store))[0] for _ in range(5))
        w = dict(lm.model.named_parameters())[ref.name]
        t_svd = min(timed(lm, lambda: block_svd(w.t() if ref.transposed else w, 4))[0] for _ in range(3))
        get_factors(lm, ref.name, 4, store)
        t_hit = min(timed(lm, lambda: get_factors(lm, ref.name, 4, store))[0] for _ in range(5))
        store.close()
    return {"revisit_ms": 1000 * t_revisit, "svd_recompute_ms": 1000 * t_svd, "svd_cache_hit_ms": 1000 * t_hit,
            "svd_matrix": ref.name}


def counted_flops(fn) -> tuple[int, list[str]]:
    """Floating-point operations that ``fn()`` executes as torch's FlopCounterMode counts them (matrix products,
    and attention where its kernel is registered), and the names of the ops it counted."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), sorted(str(op) for op in counter.get_flop_counts().get("Global", {}))


def shape_key(shape) -> str:
    """A matrix shape (out x in) as the key of ``matmul_peak``'s result: "576x1536"."""
    return "x".join(map(str, shape))


def matmul_peak(lm, rows: int, repeat: int = 20) -> dict:
    """This machine's matmul throughput (GFLOP/s, best of ``repeat``) for ``rows`` token rows times each distinct
    shape of the model's block matrices, in the weights' dtype on their device: the ceiling an evaluation can reach."""
    dtype = next(lm.model.parameters()).dtype
    shapes = sorted({tuple(r.shape) for r in lm.matrices})
    out = {}
    for n_out, n_in in shapes:
        x = torch.randn(rows, n_in, dtype=dtype, device=lm.device)
        w = torch.randn(n_in, n_out, dtype=dtype, device=lm.device)
        t, _ = timed(lm, lambda: x @ w, repeat)
        out[shape_key((n_out, n_in))] = 2 * rows * n_in * n_out / t / 1e9
    return out


def part_d(lm, splits, a: list[dict]) -> dict:
    """GFLOP of one evaluation of the calibration split, full forward and prefix path at the last layer, their
    achieved GFLOP/s from (a)'s timings, and the matmul throughput of this machine at the model's shapes."""
    ex = splits.examples("calib")
    last = lm.n_layers - 1
    ref = next(r for r in lm.matrices if r.layer == last)
    full, ops = counted_flops(lambda: evaluate(lm, ex))
    prefix = PrefixStates(lm, ex, last)
    entry = prefix.at_matrix(lm, ref.name)  # from the unedited model, as in (a)
    with edited(lm, [Edit(ref.name, 1, 0.1)]):
        tail, _ = counted_flops(lambda: evaluate(lm, ex, prefix=entry))
    rows = max(len(b) for b in prefix.batches) * max(len(s.ids) for s in prefix.seqs)  # a batch's token rows
    peak = matmul_peak(lm, rows)
    # the throughput of the forward's mix of products: its work over the time each product takes at its own rate
    weighted = sum(r.shape[0] * r.shape[1] for r in lm.matrices) / \
        sum(r.shape[0] * r.shape[1] / peak[shape_key(r.shape)] for r in lm.matrices)
    by = {r["layer"]: r for r in a}
    t_full = min(r["full_s"] for r in a)
    t_tail = by[last]["types"][ref.type]["prefix_s"]
    return {"counted_ops": ops, "full_gflop": full / 1e9, "full_s": t_full, "full_gflops": full / t_full / 1e9,
            "tail_layer": last, "tail_matrix": ref.name, "tail_gflop": tail / 1e9, "tail_s": t_tail,
            "tail_gflops": tail / t_tail / 1e9, "tokens": sum(len(s.ids) for s in prefix.seqs) + len(prefix.lead),
            "matmul_rows": rows, "matmul_gflops": peak, "matmul_gflops_model_mix": weighted,
            "full_share_of_peak": full / t_full / 1e9 / weighted, "tail_share_of_peak": tail / t_tail / 1e9 / weighted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights' dtype (float32 by default, as on a CPU; bf16 is the GPU's fast type)")
    ap.add_argument("--task", default="fever")
    ap.add_argument("--quick", action="store_true", help="LASER on --laser-layers only, the rest extrapolated")
    ap.add_argument("--laser-layers", type=int, nargs="+", default=[29])
    ap.add_argument("--q", type=int, default=5)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.9, 0.75, 0.5, 0.25, 0.1, 0.05, 0.01, 0.005])
    ap.add_argument("--repeat", type=int, default=2, help="(a): best of this many timings of each evaluation")
    ap.add_argument("--skip-b", action="store_true", help="only (a), (c) and (d)")
    ap.add_argument("--stack", type=int, default=0,
                    help="(b): candidates evaluated together, both methods (0: the product's default for the device)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lm = load_model(ModelSpec(args.model, args.device, args.dtype))
    ts = TaskSpec(args.task, n_calib=100, n_test=300, seed=0)
    splits = make_splits(load_task(ts), ts)
    dev = lm.machine
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# LASER Lab speed benchmark — {args.model} ({args.dtype}) on {args.task}, {dev}, torch {torch.__version__}, "
          f"{stamp}\n")
    a = part_a(lm, splits, args.repeat)
    print("## (a) per-candidate evaluation, 100 calibration examples\n")
    types = list(a[0]["types"])
    print(f"| layer | full forward (s) | prefix reuse, mean of {len(types)} types (s) | ratio | ratio by type "
          f"({', '.join(types)}) | blocks from the layer on | prefix build (s) | prefix RAM (MiB) |\n|---|---|---|---|---|---|---|---|")
    for r in a:
        by_type = " ".join(f"{r['types'][t]['ratio']:.2f}" for t in types)
        print(f"| {r['layer']} | {r['full_s']:.3f} | {r['prefix_s']:.3f} | {r['ratio']:.2f} | {by_type} | {r['floor']:.2f} | "
              f"{r['prefix_build_s']:.3f} | {r['prefix_mb']:.1f} |")
    sa = summary_a(a, lm.n_layers)
    print(f"\nmean ratio at the first, middle and last layer {sa['mean_first_middle_last']:.2f} (target <= 0.5); "
          f"last quarter (every layer): mean {sa['last_quarter_mean']:.2f}, worst {sa['last_quarter_worst']:.2f} at "
          f"layer {sa['last_quarter_worst_layer']} (target <= 0.2); worst single matrix type {sa['worst_type_ratio']:.2f} "
          f"({sa['worst_type']} at layer {sa['worst_type_layer']}). A layer's ratio is the mean over its matrix types "
          "(a search edits them all). 'blocks from the layer on' is the share of blocks a candidate there would run "
          "whole: the edited block runs only from the edited matrix on and the last block's MLP only at the scored "
          "positions, so ratios can fall below it.\n")
    b = None if args.skip_b else part_b(lm, splits, args, a)
    if b:
        w = b["why"]
        print("## (b) end to end: C2I vs LASER brute force\n")
        print("| method | candidates | wall time (s) | best held-out accuracy |\n|---|---|---|---|")
        print(f"| base | - | - | {b['c2i_base_test']:.3f} |")
        print(f"| C2I (q={args.q}, K={args.ks}) | {b['c2i_candidates']} | {b['c2i_s']:.1f} | {b['c2i_best_test']:.3f} |")
        print(f"| LASER ({b['n_val']} validation examples) | {b['laser_candidates_total']} | {b['laser_s']:.1f}"
              f"{' (extrapolated)' if args.quick else ''} | {b['laser_best_test']:.3f} |")
        print(f"\nspeedup {b['speedup']:.1f}x (target >= 100x); {b['note']}; both methods evaluated "
              f"{b['stack']} candidate(s) of a matrix together (--stack)\n")
        cost = w["c2i_ms_per_candidate_example"] / w["laser_ms_per_candidate_example"]
        share = (b["c2i_s"] - w["c2i_fixed_s"]) / b["c2i_s"]
        print(f"Where the ratio comes from: C2I evaluated {w['c2i_candidate_examples']} (candidate, example) pairs, "
              f"LASER {w['laser_candidate_examples']} ({w['fewer_candidate_examples']:.0f}x as many). One pair cost "
              f"C2I's search {w['c2i_ms_per_candidate_example']:.1f} ms and LASER {w['laser_ms_per_candidate_example']:.1f} "
              f"ms ({cost:.2f}x: C2I's matrices sit at layers {w['c2i_layers']}, LASER's cover every layer, and prefix "
              f"reuse skips the blocks below the edit). C2I's gradient, SVD, scores and base evaluation add "
              f"{w['c2i_fixed_s']:.1f} s. Speedup = {w['fewer_candidate_examples']:.0f} / {cost:.2f} x {share:.2f} "
              f"(search share of C2I's time) = {w['fewer_candidate_examples'] / cost * share:.1f}x.\n")
        print(f"For context, not the target: with no prefix reuse on either side (every pair at the mean full "
              f"forward of (a), {w['full_forward_ms_per_example']:.1f} ms per example; C2I's fixed costs as measured), "
              f"LASER would take {w['no_prefix_laser_s']:.1f} s and C2I {w['no_prefix_c2i_s']:.1f} s: "
              f"{w['no_prefix_laser_s'] / w['no_prefix_c2i_s']:.1f}x. Against that full forward, LASER's average pair in "
              f"its search costs {w['laser_ms_per_candidate_example'] / w['full_forward_ms_per_example']:.2f}x and "
              f"C2I's {w['c2i_ms_per_candidate_example'] / w['full_forward_ms_per_example']:.2f}x (a search's pair also "
              "carries its share of building each edit and its cached states). The target compares both with prefix "
              "reuse on, as the product runs them.\n")
    c = part_c(lm, splits)
    print("## (c) cache\n")
    print(f"revisit a cached candidate: {c['revisit_ms']:.1f} ms (target < 50 ms); SVD of {c['svd_matrix']} (K=4): "
          f"recompute {c['svd_recompute_ms']:.1f} ms vs cache hit {c['svd_cache_hit_ms']:.1f} ms")
    d = part_d(lm, splits, a)
    print("\n## (d) the physical limit\n")
    print(f"One evaluation of the {len(splits.calib)} calibration examples ({d['tokens']} tokens) executes "
          f"{d['full_gflop']:.1f} GFLOP with the full forward and {d['tail_gflop']:.2f} GFLOP with prefix reuse at layer "
          f"{d['tail_layer']} (counted by torch's FlopCounterMode; ops counted: {', '.join(d['counted_ops'])}; where the "
          "attention kernel is not among them its products, a few percent of a short prompt's work, go uncounted). In (a)'s timings that is "
          f"{d['full_gflops']:.0f} GFLOP/s and {d['tail_gflops']:.0f} GFLOP/s. This machine's matmul throughput at the "
          f"model's shapes ({d['matmul_rows']} token rows, best of 20): "
          + ", ".join(f"{k} {v:.0f}" for k, v in d["matmul_gflops"].items())
          + f" GFLOP/s, {d['matmul_gflops_model_mix']:.0f} GFLOP/s for the model's mix of matrices. The full forward "
          f"runs at {100 * d['full_share_of_peak']:.0f}% of that ceiling, the last layer's prefix path at "
          f"{100 * d['tail_share_of_peak']:.0f}% (its fixed costs weigh more on little work).")
    out = Path(args.out or Path(__file__).parent / "results" / f"speed-{lm.device.type}{'' if args.dtype == 'float32' else '-' + args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev, "date": stamp, "args": vars(args), "a": a, "a_summary": sa,
                               "b": b, "c": c, "d": d}, indent=2, default=str))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
