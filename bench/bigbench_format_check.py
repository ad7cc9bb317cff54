"""Does laser_core read BIG-bench task files as BIG-bench does? (a check against BIG-bench's own code, not a test)

  pip download --no-deps --no-binary :all: bigbench==1.0.0 -d /tmp/bb && tar xzf /tmp/bb/bigbench-1.0.0.tar.gz -C /tmp/bb
  python bench/bigbench_format_check.py /tmp/bb/bigbench-1.0.0

Runs BIG-bench's ``default_format_fn`` (taken from the sdist's ``bigbench/api/json_task.py``; the package itself
is not installed, it pulls in tensorflow) on every example of every ``task.json`` under the folder and compares
the text a model is scored on, prompt + each choice (or target), with ``load_bigbench``'s. The one difference
allowed is the space laser_core puts between a prompt and a continuation that would otherwise touch ("A:" +
"yes"). Also checks that the multiple-choice answer is BIG-bench's (the highest score), and that a generation
task's ``stop_string`` and ``output_regex`` cut answers from generated text as BIG-bench's ``postprocess_output``
(from ``bigbench/models/model_utils.py``) does. Prints a count of files, examples and mismatches, then each file
refused or mismatched.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from laser_core.bigbench import load_bigbench  # noqa: E402

_REFERENCE: dict = {}


def _reference_exec(root: str) -> None:
    logging.disable(logging.WARNING)  # the loader's warnings on "false" written as text: expected here
    src = (Path(root) / "bigbench" / "api" / "json_task.py").read_text()
    start = src.index("def default_format_fn(")
    _REFERENCE["np"] = np
    exec("from typing import Any, Dict\n" + src[start:src.index("\ndef ", start + 10)], _REFERENCE)
    exec((Path(root) / "bigbench" / "models" / "model_utils.py").read_text(), _REFERENCE)  # re + postprocess_output


def outputs(target: str) -> list[str]:
    """Texts a model might generate around an accepted answer, to cut by both readers."""
    return [f" {target}\nQ: next", f"{target}. Then more", f"\n{target}\n", f"The answer is {target}!", "",
            f" {target} and {target}1", "no answer here"]


def cut_differs(task, data: dict) -> bool:
    """Does the task cut any of :func:`outputs` of its first 20 examples' targets otherwise than BIG-bench's
    ``postprocess_output`` (up to surrounding spaces, which the match rules ignore)?"""
    stop, regex = data.get("stop_string"), data.get("output_regex")
    return any(task.answer_format.answer(text) != _REFERENCE["postprocess_output"](text, None, stop, regex).strip()
               for ex in task.examples[:20] for t in ex.targets for text in outputs(t.strip()))


def check_file(path: str) -> tuple[str, str, int, int, bool]:
    """(path, "ok" or why it was refused or differs, examples loaded, examples whose scored text or answer differ,
    whether it cuts generated answers by a stop string or regex)."""
    data = json.loads(Path(path).read_text())
    if "examples" not in data:
        return path, "no examples (a folder of subtasks)", 0, 0, False
    try:
        task = load_bigbench(path)
    except Exception as e:  # noqa: BLE001 - reported, not raised: the point is to list them
        return path, f"refused: {e}", 0, 0, False
    bad = 0
    for raw, ours in zip(data["examples"], task.examples):
        ref = _REFERENCE["default_format_fn"](
            copy.deepcopy(raw), data.get("example_input_prefix", "\nQ: "), data.get("example_output_prefix", "\nA: "),
            data.get("choice_prefix", "\n  choice: "), 42, data.get("append_choices_to_input", True))
        prompt = str(data.get("task_prefix", "") or "") + ref["input"]
        if "target_scores" in raw:
            conts = list(raw["target_scores"])
            scores = raw["target_scores"]
            best_first = next(c for c in conts if scores[c] == max(scores.values()))
            answer_ok = conts[ours.answer] == best_first
        else:
            target = raw["target"]
            conts = [c for c in ([target] if isinstance(target, str) else target) if str(c).strip()]
            answer_ok = True
        texts_ok = all(ours.prompt + mine in (prompt + c, prompt + " " + c if not prompt[-1:].isspace()
                                              and not c[:1].isspace() else None)
                       for c, mine in zip(conts, ours.choices or ours.targets))
        bad += not (texts_ok and answer_ok)
    cuts = task.kind == "gen" and task.answer_format.is_set
    if cuts and cut_differs(task, data):
        return path, "answers cut otherwise than BIG-bench's postprocess_output", len(task.examples), max(bad, 1), cuts
    return path, "ok", len(task.examples), bad, cuts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", help="the unpacked bigbench-1.0.0 sdist")
    args = ap.parse_args()
    files = sorted(str(p) for p in Path(args.root).rglob("task.json"))
    with Pool(initializer=_reference_exec, initargs=(args.root,)) as pool:
        rows = pool.map(check_file, files, chunksize=4)
    print(f"{len(rows)} task.json files, {sum(r[1] == 'ok' for r in rows)} loaded, {sum(r[2] for r in rows)} examples, "
          f"{sum(r[3] for r in rows)} whose scored text or answer differ from BIG-bench's")
    print(f"{sum(r[4] for r in rows)} generation tasks cut answers by their stop_string or output_regex; each checked against "
          "BIG-bench's postprocess_output on texts around its first 20 examples' answers")
    for path, status, n, bad, _ in rows:
        if bad or status.startswith("refused"):
            print(f"  {Path(path).relative_to(args.root)}: {status if status != 'ok' else f'{bad} of {n} differ'}")


if __name__ == "__main__":
    main()
