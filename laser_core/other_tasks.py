"""An edit beyond the task it was chosen on: the base model and the edited one on other tasks' held-out questions.

A search keeps the edit that scores best on one task; nothing in that choice says what the edit does to anything
else the model can do. Evaluating it on other tasks (the bundled ones by default) answers that with the same
evaluator: held-out test accuracy before and after, paired on the same questions (``laser_core.significance``),
and, since several tasks are read together, which changes stay beyond noise as a family (Holm).

Each other task is split as a session on it with the same sizes, seed, shots and decoding would split it, so its
results are cached under that task and shown there too (Results, Export), and a second look costs nothing.
"""
from __future__ import annotations

from typing import Sequence

from .candidates import cached_edits, evaluate_edits
from .config import Edit, TaskSpec
from .errors import Cancelled, ConfigError, LaserError, TaskFormatError
from .evaluate import CancelToken
from .models import LoadedModel
from .progress import Progress, emit
from .significance import change_between, family_summary, holm
from .store import Store
from .tasks import BUNDLED, KIND_WORDS, Splits, load_task, make_splits

SHARED_SETTINGS = ("n_calib", "n_test", "n_val", "seed", "max_new_tokens", "match", "shots")  # kept from the session's


def other_task_specs(spec: TaskSpec, tasks: Sequence[str] | None = None) -> list[TaskSpec]:
    """The tasks to evaluate an edit chosen on ``spec``'s task on: ``tasks`` (bundled names or task files, each read
    with its defaults), by default every bundled task but ``spec``'s own; each split with ``spec``'s sizes, seed,
    shots and generation settings. ``spec``'s own task and repeats are left out.

    Raises:
        ConfigError: no task is left.
    """
    own = spec.source.strip()
    names = [t.strip() for t in (BUNDLED if tasks is None else tasks) if t.strip()]
    names = [t for i, t in enumerate(names) if t != own and t not in names[:i]]
    if not names:
        raise ConfigError(f"no other task to evaluate on: {own!r} is the only one named; give others (bundled: "
                          f"{', '.join(BUNDLED)})")
    return [TaskSpec(t, **{f: getattr(spec, f) for f in SHARED_SETTINGS}) for t in names]


def other_task_splits(specs: Sequence[TaskSpec]) -> tuple[list[Splits], list[str]]:
    """The splits of :func:`other_task_specs`' tasks, and those left out as too small to split with the sizes asked
    (a session on the task would refuse them too): ``"name (why)"`` each.

    Raises:
        TaskFormatError: a task file cannot be read (not there, or malformed).
        ConfigError: every task is too small.
    """
    out, left_out = [], []
    for s in specs:
        task = load_task(s)
        try:
            out.append(make_splits(task, s, warn=False))
        except TaskFormatError as e:
            left_out.append(f"{task.name} ({e})")
    if not out:
        raise ConfigError("no other task can be split with these sizes: " + "; ".join(left_out))
    return out, left_out


def other_task_effects(lm: LoadedModel, edits: list[Edit], splits: Sequence[Splits], store: Store,
                       compute: bool = True, cancel: CancelToken | None = None,
                       progress: Progress | None = None) -> list[dict]:
    """Per task in ``splits``, the base model and the model with ``edits`` (applied together) on its held-out test
    split, each evaluation cached as any other (:func:`laser_core.candidates.evaluate_edits`).

    Args:
        compute: False reads only the cache: a task whose base or edited result is not there has None in their place.

    Returns:
        One row per task: ``task``, ``kind``, ``n`` (held-out questions), ``base`` and ``edited`` (result dicts or
        None), and, where both are there, their paired ``change`` (``significance.PairedChange``); ``error``, why
        not, where an evaluation failed (the edits overflow the model's numerics there, the task's questions are
        longer than the model's context). Cancelled is raised; what finished is cached.
    """
    runs = (("base", []), ("edited", list(edits)))
    found = [{which: cached_edits(store, lm, s, "test", chosen) for which, chosen in runs} for s in splits]
    todo = sum(doc is None for f in found for doc in f.values()) if compute else 0  # progress counts what runs: a
    rows, done = [], 0  # cached evaluation takes no time, and counting it made the first time-left estimates too short
    for s, cached in zip(splits, found):
        row = {"task": s.task.name, "kind": s.task.kind, "n": len(s.test), "base": None, "edited": None, "change": None}
        for which, chosen in runs:
            try:
                row[which] = cached[which]
                if row[which] is None and compute:
                    emit(progress, phase="other tasks", done=done, total=todo, message=f"{s.task.name}: {which}")
                    row[which], done = evaluate_edits(lm, chosen, s, "test", store, cancel), done + 1
            except Cancelled:
                raise
            except LaserError as e:  # the edits overflow the model's numerics here, or the model cannot take the task
                row["error"] = str(e)  # (questions longer than its context): the other tasks still run
                break
        row["change"] = change_between(row["base"], row["edited"])
        rows.append(row)
    emit(progress, phase="other tasks", done=todo, total=todo, message="done")
    return rows


def effects_table(rows: list[dict]) -> list[dict]:
    """:func:`other_task_effects`' rows as a table's: task, kind, n, base and edited accuracy, the paired change
    (``vs_base``, ``ci95``, ``p``) and ``beyond_noise``: "yes" for a change real alone (p < 0.05) that stays real
    read with the others (Holm), "alone only" for one that does not; blank where the change is noise."""
    tested = [r for r in rows if r["change"] is not None]
    together = dict(zip((id(r) for r in tested), holm([r["change"].p_value for r in tested])))
    out = []
    for r in rows:
        c = r["change"]
        verdict = "" if c is None or not c.significant else "yes" if together[id(r)] else "alone only"
        out.append({"task": r["task"], "kind": KIND_WORDS.get(r["kind"], r["kind"]), "n": r["n"],
                    "base": r["base"]["accuracy"] if r["base"] else None,
                    "edited": r["edited"]["accuracy"] if r["edited"] else None,
                    "vs_base": c.change if c else None, "ci95": f"{c.low:+.3f} to {c.high:+.3f}" if c else "",
                    "p": c.p_value if c else None, "beyond_noise": verdict, "note": r.get("error", "")})
    return out


def effects_metrics(rows: list[dict]) -> list[dict]:
    """:func:`other_task_effects`' rows that have a paired change, as a recipe's ``metrics.other_tasks`` holds them
    (plain data: task, n, base and edited accuracy, the change's ``PairedChange.to_dict()``)."""
    return [{"task": r["task"], "n": r["n"], "base": r["base"]["accuracy"], "edited": r["edited"]["accuracy"],
             "change": r["change"].to_dict()} for r in rows if r["change"] is not None]


def effects_lines(rows: list[dict]) -> list[str]:
    """:func:`other_task_effects`' rows as text lines, one per task, and a last one on them as a family."""
    lines = []
    for r in rows:
        c = r["change"]
        head = f"{r['task']:<20} held-out n={r['n']:<4}"
        if r.get("error"):
            lines.append(f"{head} not evaluated: {r['error']}")
        elif c is None:
            lines.append(f"{head} not evaluated")
        else:
            lines.append(f"{head} base {c.before:.3f} -> edited {c.after:.3f}  {c.summary()}")
    tests = [(r["task"], r["change"].p_value) for r in rows if r["change"] is not None]
    if len(tests) > 1:
        lines.append(family_summary(tests))
    return lines

