"""Few-shot prompts: solved examples of a task, which no split holds, put before every prompt. Which examples they
are is :func:`laser_core.tasks.make_splits`'s to say (the last of its shuffled order, so that the splits are the
zero-shot ones wherever the task has examples to spare)."""
from __future__ import annotations

from dataclasses import replace

from .errors import TaskFormatError
from .tasks import Example, Task, make_task


def solved(example: Example) -> str:
    """``example`` with its answer: the prompt, then the right choice (or the first accepted answer)."""
    return example.prompt + (example.choices[example.answer] if example.choices else example.targets[0])


def with_shots(task: Task, shots: list[int]) -> Task:
    """``task`` with every prompt led by the examples at ``shots``, solved, each followed by the task's
    ``shot_separator``; its ``task_prefix``, a text every prompt starts with (a BIG-bench file's), is said once,
    before the first. The examples keep their places, so split indices stay valid. One preamble serves every
    prompt, so it runs once per evaluation (the shared lead).

    BIG-bench instead draws other solved examples for each question, from all of them; here they are the same for
    every question and asked by no split, so that no held-out question is ever shown solved.

    Raises:
        TaskFormatError: a prompt that does not start with the task prefix.
    """
    if not shots:
        return task
    prefix = task.task_prefix
    if not all(e.prompt.startswith(prefix) for e in task.examples):
        raise TaskFormatError(f"task {task.name!r}: not every prompt starts with the task prefix {prefix!r}")
    lead = prefix + "".join(solved(task.examples[i])[len(prefix):] + task.shot_separator for i in shots)
    return make_task(task.name, [replace(e, prompt=lead + e.prompt[len(prefix):]) for e in task.examples],
                     task.answer_format, task.shot_separator, task.task_prefix)
