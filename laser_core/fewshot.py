"""Few-shot prompts: solved examples drawn from a task, kept out of every split, and put before every prompt."""
from __future__ import annotations

import random
from dataclasses import replace

from .errors import TaskFormatError
from .tasks import Example, Task, make_task

RECORDS_SEPARATOR = "\n\n"  # between the solved examples of a task that is not a BIG-bench file (which sets its own)


def solved(example: Example) -> str:
    """``example`` with its answer: the prompt, then the right choice (or the first accepted answer)."""
    return example.prompt + (example.choices[example.answer] if example.choices else example.targets[0])


def with_shots(task: Task, shots: int, seed: int, separator: str = RECORDS_SEPARATOR, prefix: str = "") -> Task:
    """``task`` few-shot: ``shots`` distinct examples drawn with ``seed`` are taken out of it (with their repeats),
    and every other prompt starts with them, solved, each followed by ``separator``. ``prefix``, a text every prompt
    starts with (a BIG-bench ``task_prefix``), is said once, before the first. One preamble serves every prompt, so
    it runs once per evaluation (the shared lead), and no question is ever shown solved to another.

    BIG-bench instead draws other solved examples for each question, from all of them; here they are fixed, so
    that a held-out test question never appears, solved, in a prompt.

    Raises:
        TaskFormatError: fewer than ``shots`` + 1 distinct examples, or a prompt that does not start with
            ``prefix``.
    """
    if shots == 0:
        return task
    distinct: dict[tuple, int] = {}
    for i, e in enumerate(task.examples):
        distinct.setdefault((e.prompt, e.choices, e.targets), i)
    if shots >= len(distinct):
        raise TaskFormatError(f"task {task.name!r} has {len(distinct)} distinct examples, too few for {shots} few-shot "
                              f"examples and a question; use at most {len(distinct) - 1} shots")
    if not all(e.prompt.startswith(prefix) for e in task.examples):
        raise TaskFormatError(f"task {task.name!r}: not every prompt starts with the task prefix {prefix!r}")
    drawn = sorted(random.Random(f"shots-{seed}").sample(sorted(distinct.values()), shots))
    lead = prefix + "".join(solved(task.examples[i])[len(prefix):] + separator for i in drawn)
    kept = {(task.examples[i].prompt, task.examples[i].choices, task.examples[i].targets) for i in drawn}
    return make_task(task.name, [replace(e, prompt=lead + e.prompt[len(prefix):]) for e in task.examples
                                 if (e.prompt, e.choices, e.targets) not in kept], task.answer_format)
