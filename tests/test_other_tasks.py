"""An edit on other tasks than its own (laser_core.other_tasks, eval --other-tasks), on tiny models."""
from __future__ import annotations

import re

import pytest

from conftest import write_jsonl, write_mc_jsonl
from laser_core import ConfigError, Edit, TaskSpec, edited, evaluate
from laser_core.cli import main
from laser_core.card import model_card
from laser_core.other_tasks import (effects_lines, effects_metrics, effects_table, other_task_effects,
                                    other_task_specs, other_task_splits)
from laser_core.recipe import make_recipe, recipe_metrics
from laser_core.saving import save_recipe
from laser_core.significance import p_text, paired_change
from laser_core.tasks import BUNDLED


def _tasks(tmp_path):
    """Two small multiple-choice tasks of other questions, and one whose prompts the tiny models cannot take."""
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": f"{k} " + "word " * 300 + "Answer:", "choices": ["yes", "no"],
                                                  "answer": k % 2} for k in range(40)])
    return [str(write_mc_jsonl(tmp_path / "a.jsonl", 60, seed=1)), str(write_mc_jsonl(tmp_path / "b.jsonl", 60, seed=2)),
            str(long)]


def test_other_tasks_are_every_bundled_one_but_its_own_split_with_its_settings():
    spec = TaskSpec("qa_wikidata", n_calib=30, n_test=50, n_val=40, seed=7, shots=2, max_new_tokens=9, match="word")
    specs = other_task_specs(spec)
    assert [s.source for s in specs] == [t for t in BUNDLED if t != "qa_wikidata"]
    assert {(s.n_calib, s.n_test, s.n_val, s.seed, s.shots, s.max_new_tokens, s.match) for s in specs} == \
        {(30, 50, 40, 7, 2, 9, "word")}
    assert [s.source for s in other_task_specs(TaskSpec("my.jsonl"))] == list(BUNDLED)  # a file: all four
    named = other_task_specs(spec, ["fever", " qa_wikidata", "fever", "x.jsonl"])  # its own and repeats left out
    assert [s.source for s in named] == ["fever", "x.jsonl"]
    assert named[1].prompt_col == "prompt"  # a task file is read with the defaults, not the session's columns
    with pytest.raises(ConfigError, match="no other task to evaluate on: 'fever' is the only one named"):
        other_task_specs(TaskSpec("fever"), ["fever", ""])


def test_an_edit_on_other_tasks_is_paired_with_the_base_on_their_held_out_questions(tiny_lm, store, tmp_path):
    lm = tiny_lm("llama")
    own = TaskSpec(str(tmp_path / "own.jsonl"), n_calib=20, n_test=30, seed=3)
    specs = other_task_specs(own, _tasks(tmp_path))
    splits, left_out = other_task_splits(specs)
    assert left_out == []
    assert [len(s.test) for s in splits] == [28, 28, 12]  # small tasks: the test split gives way to validation
    edits = [Edit(lm.matrices[0].name, 1, 0.1), Edit(lm.matrices[-1].name, 2, 0.1)]
    before = other_task_effects(lm, edits, splits, store, compute=False)  # nothing in the cache yet
    assert [(r["base"], r["edited"], r["change"]) for r in before] == [(None, None, None)] * 3
    events = []
    rows = other_task_effects(lm, edits, splits, store, progress=events.append)
    # the long task's base fails: its edited evaluation is not tried
    assert [e["done"] for e in events] == [0, 1, 2, 3, 4, 6] and {e["total"] for e in events} == {6}
    for s, r in zip(splits[:2], rows):  # against evaluations made here, with the edits applied by hand
        base = evaluate(lm, s.examples("test"))
        with edited(lm, edits):
            after = evaluate(lm, s.examples("test"))
        assert (r["base"]["correct"], r["edited"]["correct"]) == (base.correct, after.correct)
        assert r["change"] == paired_change(base.correct, after.correct) and r["n"] == 28 and "error" not in r
    assert rows[2]["change"] is None and "longer than the model's context" in rows[2]["error"]  # the others still ran
    again = other_task_effects(lm, edits, splits, store, compute=False)  # now read from the cache
    assert [r["change"] for r in again[:2]] == [r["change"] for r in rows[:2]]
    events.clear()  # another edit: the bases are cached, so progress counts only what runs (and the long task)
    other_task_effects(lm, edits[:1], splits, store, progress=events.append)
    assert [(e["done"], e["message"]) for e in events] == [(0, "a: edited"), (1, "b: edited"), (2, "long: base"),
                                                           (4, "done")] and {e["total"] for e in events} == {4}
    table = effects_table(rows)
    assert [t["task"] for t in table] == ["a", "b", "long"] and table[0]["base"] == rows[0]["base"]["accuracy"]
    assert table[2]["note"] == rows[2]["error"] and table[2]["vs_base"] is None
    lines = effects_lines(rows)
    assert lines[0].startswith("a ") and f"base {rows[0]['change'].before:.3f} -> edited" in lines[0]
    assert "not evaluated: " in lines[2] and lines[3].startswith("Read together, as 2 tests")
    measured = effects_metrics(rows)  # into a recipe, and from it a saved model's card
    assert [(m["task"], m["n"], m["change"]["fixed"]) for m in measured] == \
        [(r["task"], 28, r["change"].fixed) for r in rows[:2]]
    card = model_card(make_recipe(lm, edits, own, recipe_metrics("calib", None, None, other_tasks=measured)))
    table = card.split("## On other tasks")[1].splitlines()
    c = rows[0]["change"]
    assert table[6] == (f"| a | 28 | {c.before:.3f} | {c.after:.3f} | {c.change:+.3f} | {c.low:+.3f} to {c.high:+.3f} "
                        f"| {p_text(c.p_value).split(' ', 1)[1].removeprefix('= ')} |")  # '0.34', '< 0.001'
    assert table[7].startswith("| b | 28 |") and table[9].startswith("Read together, as 2 tests")
    assert "## On other tasks" not in model_card(make_recipe(lm, edits, own, recipe_metrics("calib", None, None)))


def test_a_change_real_alone_is_marked_so_where_it_does_not_stay_real_among_the_tasks():
    def row(task, fixed, broken):  # 200 questions, ``fixed`` of them fixed and ``broken`` broken by the edit
        before = [False] * fixed + [True] * broken + [True] * (200 - fixed - broken)
        after = [True] * fixed + [False] * broken + [True] * (200 - fixed - broken)
        return {"task": task, "kind": "mc", "n": 200, "base": None, "edited": None,
                "change": paired_change(before, after)}
    rows = [row("strong", 0, 20), row("weak", 3, 11), row("none", 5, 5)]
    assert [r["change"].p_value < 0.05 for r in rows] == [True, True, False]
    assert 0.05 / 2 < rows[1]["change"].p_value  # Holm: the second smallest p must be below 0.05 / 2
    assert [t["beyond_noise"] for t in effects_table(rows)] == ["yes", "alone only", ""]
    assert effects_lines(rows)[-1].endswith("strong stays beyond noise.")


def test_cli_eval_other_tasks_prints_each_task_after_the_recipes_own(tiny_lm, tiny_dirs, tmp_path, capsys):
    lm = tiny_lm("llama")
    own = write_mc_jsonl(tmp_path / "own.jsonl", 60)
    recipe = save_recipe(make_recipe(lm, [Edit(lm.matrices[0].name, 1, 0.1)]), tmp_path / "r.json")
    args = ["--model", str(tiny_dirs["llama"]), "--device", "cpu", "--task", str(own), "--n-calib", "20",
            "--n-test", "30", "--cache-dir", str(tmp_path / "c")]
    a, b, long = _tasks(tmp_path)
    assert main(["eval", *args, "--recipe", str(recipe), "--other-tasks", f"{a},{b},{own}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test: accuracy") and out[2].startswith("held-out change")
    assert out[3] == "on other tasks, held-out test, base -> with the recipe:"
    assert re.match(r"  a +held-out n=28 +base [\d.]+ -> edited [\d.]+ +[+-][\d.]+ \(95% CI", out[4])
    assert out[5].startswith("  b ") and out[6].startswith("  Read together, as 2 tests") and len(out) == 7
    assert main(["eval", *args, "--other-tasks"]) == 2  # without a recipe there is nothing to compare
    assert "--other-tasks compares the base model with a recipe's edits: give --recipe too" in capsys.readouterr().err
    assert main(["eval", *args, "--recipe", str(recipe), "--other-tasks", str(tmp_path / "gone.jsonl")]) == 2
    assert "task not found" in (err := capsys.readouterr().err) and "loading" not in err  # before the model load
    # a task too small for the sizes asked is left out, as a session on it would refuse it; the others still run
    small = write_mc_jsonl(tmp_path / "small.jsonl", 15, seed=5)
    assert main(["eval", *args, "--recipe", str(recipe), "--other-tasks", f"{a},{small}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[4].startswith("  a ") and len(out) == 6
    assert out[5] == ("  left out, too small for these sizes: small (task 'small' has 15 distinct examples, too few "
                      "for 20 calibration examples plus at least 1 test example; lower the calibration size (n_calib) "
                      "to at most 14, e.g. 7 to leave the rest for validation and test)")
    assert main(["eval", *args, "--recipe", str(recipe), "--other-tasks", str(small)]) == 2  # none left: why, at once
    assert "no other task can be split with these sizes: small (task 'small' has 15" in (err := capsys.readouterr().err)
    assert "loading" not in err
