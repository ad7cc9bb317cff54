"""BIG-bench task files, read as BIG-bench's own JsonTask reads them (zero-shot, or few-shot with
``TaskSpec.shots``); checked against BIG-bench's formatter by ``bench/bigbench_format_check.py``."""
from __future__ import annotations

import logging
from pathlib import Path

from .answers import AnswerFormat
from .config import TaskSpec, read_json
from .errors import TaskFormatError
from .tasks import Task, gen_example, make_task, mc_example

log = logging.getLogger(__name__)


BIGBENCH_SEED = 42  # BIG-bench's JsonTask default: it orders the listed choices of every example with this seed


def _bigbench_text(data: dict, key: str, default: str, where: str) -> str:
    value = data.get(key, default)
    if value is None:
        return ""  # null: no prefix (BIG-bench would print "None" or fail)
    if not isinstance(value, str):
        raise TaskFormatError(f"{where}: {key!r} must be text, got {value!r}")
    return value


def listed_choices(choices: list[str], prefix: str) -> str:
    """The choices as BIG-bench appends them to an input: each after ``prefix``, sorted, then permuted with a
    generator seeded anew for every example (so every example with n choices lists them in one order)."""
    import numpy as np

    return prefix + prefix.join(np.random.RandomState(seed=BIGBENCH_SEED).permutation(sorted(choices)))


def load_bigbench(path: str | Path, name: str | None = None, data: dict | None = None) -> Task:
    """Read a BIG-bench ``task.json`` (``target_scores`` -> multiple choice, ``target`` -> generation), zero-shot.

    The prompt is built as BIG-bench's JsonTask builds it: ``task_prefix + example_input_prefix + input``, then, for
    multiple choice with ``append_choices_to_input`` (true unless the file says false), the choices each after
    ``choice_prefix`` in BIG-bench's order, then ``example_output_prefix``. Unset prefixes take BIG-bench's
    defaults ("\\nQ: ", "\\n  choice: ", "\\nA: "); a null one is empty. The answer is the choice of highest
    score (the first of equals).

    ``data``: the file's content where the caller has read it already.

    Few-shot (:mod:`laser_core.fewshot`), the solved examples are separated by the file's
    ``few_shot_example_separator`` (BIG-bench's default: a line break), after its ``task_prefix`` said once.

    A generation task's answers are cut from the decoded text by the file's ``stop_string`` and ``output_regex``,
    as BIG-bench cuts them (:func:`answer_format`).

    ``append_choices_to_input`` is read as BIG-bench reads it, by truth value (seven of its tasks write the text
    "false", which BIG-bench takes as true), with a warning when it is not true or false.

    Raises:
        TaskFormatError: not JSON, no ``examples`` list, a prefix that is not text, a stop string or output regex
            that is not text (or a regex that does not compile), or an example without an input, without targets,
            or whose scores name no best choice.
    """
    path = Path(path)
    label = f"{path.parent.name}/{path.name}" if path.name == "task.json" else path.name  # BIG-bench's own tree
    data = read_json(path) if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        subtasks = sorted(p.parent.name for p in path.parent.glob("*/task.json"))
        if subtasks and isinstance(data, dict) and "examples" not in data:  # BIG-bench's folder of subtasks
            shown = ", ".join(subtasks[:6]) + (f", ... ({len(subtasks)} in all)" if len(subtasks) > 6 else "")
            raise TaskFormatError(f"{path}: a BIG-bench task of subtasks, with no examples of its own; load one of its "
                                  f"subtask folders: {shown}")
        raise TaskFormatError(f"{path}: not a BIG-bench task: it needs an 'examples' list")
    pre, inp, out, choice_prefix = (_bigbench_text(data, key, default, label) for key, default in (
        ("task_prefix", ""), ("example_input_prefix", "\nQ: "), ("example_output_prefix", "\nA: "),
        ("choice_prefix", "\n  choice: ")))
    listed = data.get("append_choices_to_input", True)
    if not isinstance(listed, bool):  # e.g. the text "false" in 7 tasks of BIG-bench 1.0.0
        log.warning("%s: 'append_choices_to_input' is %r, not true or false; read as BIG-bench reads it: %s, the "
                    "choices are %s the prompt", label, listed, bool(listed), "listed in" if listed else "left out of")
        listed = bool(listed)

    def prompt(body: str) -> str:  # BIG-bench's JsonTask: task prefix, input prefix, input (and choices), output prefix
        return f"{pre}{inp}{body}{out}"
    examples = []
    for i, ex in enumerate(data["examples"]):
        where = f"{label}: example {i}"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise TaskFormatError(f"{where}: has no 'input' text")
        if "target_scores" in ex:
            scores = ex["target_scores"]
            if not isinstance(scores, dict) or not scores or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
                raise TaskFormatError(f"{where}: 'target_scores' must map each choice to a number")
            choices = list(scores)
            best = max(scores.values())
            if best <= (min(scores.values()) if len(scores) > 1 else 0):
                raise TaskFormatError(f"{where}: no choice scores above the others in 'target_scores' "
                                      f"{str(scores)[:200]}")
            body = ex["input"] + (listed_choices(choices, choice_prefix) if listed else "")
            examples.append(mc_example(prompt(body), choices,
                                        next(j for j, c in enumerate(choices) if scores[c] == best), where))
        elif "target" in ex:
            target = ex["target"]  # text is one answer as written ("[]" included), not JSON to parse
            examples.append(gen_example(prompt(ex["input"]), [target] if isinstance(target, str) else target, where))
        else:
            raise TaskFormatError(f"{where}: has neither 'target_scores' nor 'target'")
    separator = _bigbench_text(data, "few_shot_example_separator", "\n", label)  # BIG-bench's few-shot layout
    return make_task(name or data.get("name", path.stem), examples, answer_format(data, label), separator, pre)


def answer_format(data: dict, label: str) -> AnswerFormat:
    """The file's ``stop_string`` and ``output_regex`` (a null one is unset), which cut a generated answer as
    BIG-bench cuts it. A file with neither keeps the first line of the answer, as LASER reads qa_wikidata's; BIG-bench
    would then take the text up to the first ``.?!;`` or newline (its default regex)."""
    try:
        return AnswerFormat(data.get("stop_string"), data.get("output_regex"))
    except TaskFormatError as e:
        raise TaskFormatError(f"{label}: {e}") from None


def bigbench_task(path: Path, spec: TaskSpec, name: str | None = None, data: dict | None = None) -> Task:
    """:func:`load_bigbench`, refusing the column-reading settings, which a task.json has no columns for. Warns where
    the file cuts answers for BIG-bench's exact match and ``spec`` matches them by another rule."""
    if spec.prompt_template or spec.fixed_choices:
        what = "a prompt template" if spec.prompt_template else "fixed choices"
        raise TaskFormatError(f"{what} applies to JSONL, CSV, JSON-array, Parquet and hf: tasks (their columns); "
                              f"{spec.source!r} is a BIG-bench task, whose prompts and choices its task.json defines: "
                              f"leave {what} empty")
    data = read_json(path) if data is None else data
    task = load_bigbench(path, name=name, data=data)
    if task.answer_format.is_set and spec.match != "exact" and data.get("preferred_score") == "exact_str_match":
        log.warning("%s: BIG-bench scores this task by exact match of the answer its %s cuts; here answers are "
                    "matched by the '%s' rule (which finds '5' in '15'): answer match 'exact' (--match exact) scores "
                    "them as BIG-bench does", task.name, task.answer_format.describe(), spec.match)
    return task
