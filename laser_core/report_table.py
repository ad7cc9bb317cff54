"""The report's table (:func:`laser_core.report.paper_table`'s result) as markdown, in the layout of the paper's
Table 1: held-out accuracy of each method, marked where it differs from the base beyond noise, search time and
speedup, the settings the run used and, where the run measured them, each task's edit on the other tasks."""
from __future__ import annotations

from .config import CONTIGUOUS, SearchConfig
from .grouping import GROUPINGS
from .search import SPEED_ONLY
from .significance import family_summary, p_text

METHODS = {"laser": "LASER", "c2i_k1": "C2I K=1", "c2i_kgrid": "C2I K grid"}  # the table's edited columns


def methods_of(row: dict) -> dict[str, str]:
    """The edited columns a row of the table has: :data:`METHODS`, and C2I's K grid under another row grouping where
    the run asked for one (``c2i_kgrid_clustered``: "C2I K grid clustered")."""
    extra = {f"c2i_kgrid_{g}": f"C2I K grid {g}" for g in GROUPINGS if g != CONTIGUOUS and f"c2i_kgrid_{g}_test" in row}
    return {**METHODS, **extra}


def edit_text(best: dict) -> str:
    """A search's best edit in short, as the report's and ``searches``' tables print it: 'L2.down K=8 rho=0.1'
    ('L2.down K=8 clustered rho=0.1' for rows grouped otherwise than contiguously)."""
    rows = f" {best['grouping']}" if best.get("grouping") else ""
    return f"L{best['layer']}.{best['type']} K={best['k']}{rows} rho={best['rho']}"


def _marked(row: dict, label: str) -> str:
    """A method's held-out accuracy, with a dagger where it differs from the base beyond noise."""
    change = row.get(f"{label}_change")  # absent in rows written before the paired test was added
    return f"{row[f'{label}_test']:.3f}" + ("†" if change and change["significant"] else "")


def row_line(row: dict) -> str:
    """A task's held-out accuracies on one line, marked as in the table: 'fever: base 0.523, LASER 0.550†, …'."""
    return f"{row['task']}: base {row['base_test']:.3f}, " + ", ".join(f"{name} {_marked(row, label)}"
                                                                      for label, name in methods_of(row).items())


def _change_text(change: dict) -> str:
    return f"{change['change']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}] {p_text(change['p_value'])}"


def _speed_text(settings: dict) -> str:
    """The run's speed-only settings where any differs from the default (empty for a run with the defaults, or a JSON
    from before they were recorded). They change the table's times, not the edits found."""
    words = {"prefix_reuse": "prefix reuse off", "stack": f"stack {settings.get('stack')} (candidates of one matrix "
             f"evaluated together)", "prefix_budget_mb": f"cached states up to {settings.get('prefix_budget_mb')} MB"}
    changed = [words[name] for name in SPEED_ONLY if settings.get(name, getattr(SearchConfig, name))
               != getattr(SearchConfig, name)]
    return ("Speed settings of every method (they change the times, not the edits found): " + "; ".join(changed)
            + ".") if changed else ""


def table_markdown(result: dict) -> str:
    """The table in the layout of the paper's Table 1 (held-out test accuracy, search time, speedup)."""
    s = result["settings"]
    methods = methods_of(result["rows"][0]) if result["rows"] else METHODS
    c2i = [label for label in methods if label != "laser"]
    header = ["task", "base", *methods.values(), "LASER time (s)", *(f"{methods[c]} time (s) / speedup" for c in c2i)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        cells = [r["task"], f"{r['base_test']:.3f}", *(_marked(r, label) for label in methods),
                 f"{r['laser_s']:.0f}{'*' if s['quick'] else ''}", *(f"{r[f'{c}_s']:.0f} / {r[f'{c}_speedup']:.1f}x" for c in c2i)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Held-out test accuracy; model `{s['model']}` on {s.get('machine', s['device'])}, {s.get('date', '')}; seed {s['seed']}, calibration "
                 f"{s['n_calib']}, test up to {s['n_test']} (per task: "
                 + ", ".join(f"{r['task']} {r['n_test']}" for r in result["rows"]) + f"); q={s['q']}, K grid {s['ks']}, "
                 f"rho grid {s['rhos']}; LASER on the 20% validation split, layers {s['laser_layers']}.")
    lines += [text for text in [_speed_text(s)] if text]
    if s["quick"]:
        lines.append("*quick mode: LASER measured on its last layer only with validation capped at 200 examples; its "
                     "time is extrapolated to all layers (probe-interpolated) and to the full validation split "
                     "(linear in examples), and its accuracy is the best of the measured layer only.")
    if all(f"{label}_change" in r for r in result["rows"] for label in methods):
        lines.append("†: differs from the base beyond noise (McNemar mid-p < 0.05 on the paired held-out questions). "
                     "Change from the base, 95% interval, p: " + "; ".join(
                         f"{r['task']}: " + ", ".join(f"{name} {_change_text(r[f'{label}_change'])}"
                                                      for label, name in methods.items()) for r in result["rows"]))
        lines.append(family_summary([(f"{r['task']} {name}", r[f"{label}_change"]["p_value"])
                                  for r in result["rows"] for label, name in methods.items()]))
    lines += transfer_markdown(result)
    lines.append("Best edits: " + "; ".join(f"{r['task']}: " + ", ".join(f"{name} {r[f'{label}_best']}"
                                                                         for label, name in methods.items())
                                            for r in result["rows"]))
    return "\n".join(lines)


def transfer_markdown(result: dict) -> list[str]:
    """The report's ``transfer`` (:func:`transfer_rows`) as a table: a row per task's C2I K-grid edit, a column per
    task it is evaluated on (its own task: the table's change), each cell the held-out change from that task's base;
    then which changes on other tasks stay beyond noise read together (an edit that several tasks' searches chose
    counts once per task it is evaluated on). Nothing where the run did not measure it."""
    transfer = result.get("transfer") or []
    cells = {(t["from"], t["to"]): t["change"] for t in transfer}
    if not cells:
        return []
    rows = {r["task"]: r for r in result["rows"]}
    tasks = list(rows)
    lines = ["", "Each task's C2I K grid edit on the other tasks (held-out test, change from that task's base; "
             "†: beyond noise alone; own: the table's):", "",
             "| edit found on | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    def cell(src: str, t: str) -> str:
        c = rows[src].get("c2i_kgrid_change") if t == src else cells.get((src, t))
        return "–" if c is None else f"{c['change']:+.3f}" + "†" * c["significant"] + " own" * (t == src)
    for src in tasks:
        lines.append(f"| {src} ({rows[src]['c2i_kgrid_best']}) | " + " | ".join(cell(src, t) for t in tasks) + " |")
    tests = {(t.get("name"), t.get("k"), t.get("rho"), t.get("grouping"), t["edit"], t["to"]): t["change"]["p_value"]
             for t in transfer}  # the same edit on a task: one test
    lines += ["", family_summary([(f"{key[-2]} on {key[-1]}", p) for key, p in tests.items()]), ""]
    return lines
