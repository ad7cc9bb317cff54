"""Tasks: examples of one kind (multiple choice or generation), loading a task from where it is (BIG-bench:
:mod:`laser_core.bigbench`; files and datasets of records: :mod:`laser_core.records`; few-shot:
:mod:`laser_core.fewshot`) and seeded disjoint splits. How a generated answer is read and scored:
:mod:`laser_core.answers`."""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

from .answers import FIRST_LINE, AnswerFormat
from .config import TaskSpec, read_json, split_choices, stable_hash
from .errors import TaskFormatError

log = logging.getLogger(__name__)
DATA_DIR = Path(__file__).resolve().parent / "data" / "bigbench"
BUNDLED: dict[str, str] = {
    "fever": "fever.json",
    "epistemic_reasoning": "epistemic_reasoning.json",
    "qa_wikidata": "qa_wikidata.json",
    "truthful_qa": "truthful_qa_mc.json",
}
KIND_WORDS = {"mc": "multiple choice", "gen": "generation"}  # a task's kind, as pages and tables say it
SPLIT_WORDS = {"calib": "calibration", "val": "validation", "test": "held-out test"}  # a split, as messages say it


@dataclass(frozen=True)
class Example:
    """One example. Multiple choice: ``choices`` + ``answer`` index. Generation: ``targets`` (accepted answers).

    The continuation scored after ``prompt`` is a choice (or target) as written; a trailing space of the
    prompt is moved into the continuation so that tokenizers see " true", not " " + "true".
    """

    prompt: str
    choices: tuple[str, ...] = ()
    answer: int = -1
    targets: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "mc" if self.choices else "gen"


@dataclass(frozen=True)
class Task:
    """A named list of examples of one kind."""

    name: str
    kind: str  # "mc" or "gen"
    examples: tuple[Example, ...]
    digest: str  # hash of the examples (and answer format, where set): part of every cache key
    answer_format: AnswerFormat = FIRST_LINE  # generation: how an answer is cut from the decoded text
    shot_separator: str = "\n\n"  # few-shot: after each solved example (a BIG-bench file's own, else a blank line)
    task_prefix: str = ""  # a text every prompt starts with, said once before the solved examples (BIG-bench's)

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class Splits:
    """Disjoint calibration / validation / held-out test parts of a task (indices into ``task.examples``)."""

    task: Task
    spec: TaskSpec
    calib: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def examples(self, split: str) -> list[Example]:
        """Examples of ``split`` ("calib", "val" or "test")."""
        return [self.task.examples[i] for i in getattr(self, split)]

    def key(self, split: str) -> dict:
        """Identity of one split for cache keys."""
        return {"task": self.task.digest, "split": split, "seed": self.spec.seed,
                "ids": stable_hash(list(getattr(self, split)))}


def make_task(name: str, examples: list[Example], answer_format: AnswerFormat = FIRST_LINE,
              shot_separator: str = "\n\n", task_prefix: str = "") -> Task:
    """A task of ``examples``, all of one kind, with the digest that keys its cached results. ``answer_format``:
    for generation, how answers are cut from the decoded text; a multiple-choice task has none. ``shot_separator``
    and ``task_prefix``: how solved examples are laid out when it is split few-shot (:mod:`laser_core.fewshot`)."""
    if not examples:
        raise TaskFormatError(f"task {name!r} has no examples")
    kinds = {e.kind for e in examples}
    if len(kinds) > 1:
        raise TaskFormatError(f"task {name!r} mixes multiple-choice and generation examples; split it in two")
    kind = kinds.pop()
    answer_format = answer_format if kind == "gen" else FIRST_LINE
    content: object = [[e.prompt, e.choices, e.answer, e.targets] for e in examples]
    if answer_format.is_set:  # a task without one keeps the digest (and cached results) it had before
        content = {"examples": content, "answer_format": [answer_format.stop_string, answer_format.output_regex]}
    digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]
    return Task(name, kind, tuple(examples), digest, answer_format, shot_separator, task_prefix)


def marks_its_answer(choices) -> bool:
    """Do ``choices`` carry their own answer, as ``{"choices": [...], "labels": [0, 1, ...]}`` does?"""
    return isinstance(choices, dict) and isinstance(choices.get("choices"), (list, tuple)) \
        and isinstance(choices.get("labels"), (list, tuple))


def mc_example(prompt, choices, answer, where: str, ambiguous: list | None = None, base: int = 0) -> Example:
    """``answer``: a number is a choice index; a string is a choice's text where it is one, else an index in digits.
    ``choices``: a list, or a JSON or "a|b|c" string of one, or a ``{"text": [...], "label": [...]}`` mapping, whose
    label the answer may be ("B" for the second choice), or ``{"choices": [...], "labels": [0, 1, ...]}``, which
    marks the right one with 1 (``answer`` is then not read). ``base``: the index an answer gives the first choice
    (1 where a set counts from 1); a choice's text, label or mark is read as it is.

    An answer that could name two choices (a digit string that is one choice's text and another's index, or a
    number that is one choice's index and another's text) is read by that rule; ``where`` is then appended to
    ``ambiguous`` (the caller warns once per file).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise TaskFormatError(f"{where}: the prompt is empty or not text")
    if isinstance(choices, str):
        choices = split_choices(choices)
    labels: list[str] = []
    named = False  # the answer was given by a label or a mark, not as an index or a text: it cannot be ambiguous
    if marks_its_answer(choices):  # TruthfulQA's mc1_targets on the hub: {"choices": [...], "labels": [0, 1, 0]}
        flags = list(choices["labels"])
        if len(flags) != len(choices["choices"]) or sorted(flags) != [0] * (len(flags) - 1) + [1]:
            several = " (a set with several right answers, as mc2_targets, is not one)" if sum(flags) > 1 else ""
            raise TaskFormatError(f"{where}: the labels {flags} must mark exactly one of the {len(choices['choices'])} "
                                  f"choices with 1{several}")
        choices, answer, named = choices["choices"], flags.index(1), True
    elif isinstance(choices, dict) and isinstance(choices.get("text"), (list, tuple)):
        # the hub's {"text": [...], "label": ["A", "B", ...]} (ARC, OpenBookQA, CommonsenseQA): the answer is a label
        labels = [str(x) for x in choices.get("label") or []]
        choices = choices["text"]
        if len(labels) == len(choices) and not isinstance(answer, bool) and str(answer) in labels:
            answer, named = labels.index(str(answer)), True
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise TaskFormatError(f"{where}: a multiple-choice example needs a list of at least 2 choices, got {choices!r}")
    choices = [str(c) for c in choices]
    ex = _shift_space(Example(prompt, tuple(choices), 0))  # the choices as they continue the prompt
    clash = [c for c, spaced in zip(choices, ex.choices) if ex.choices.count(spaced) > 1]
    if clash:  # the model cannot tell them apart: which one is right would be decided by their order
        repeated = sorted({c for c in choices if choices.count(c) > 1})
        if repeated:
            raise TaskFormatError(f"{where}: the choices repeat {', '.join(map(repr, repeated))}; give each choice once")
        raise TaskFormatError(f"{where}: the choices {', '.join(map(repr, clash))} read the same after the prompt "
                              "(they differ only by a leading space); give each once")
    if isinstance(answer, bool) or (isinstance(answer, float) and not answer.is_integer()):
        raise TaskFormatError(f"{where}: answer must be a choice index or the choice text, got {answer!r}")
    as_number = not isinstance(answer, str)
    if isinstance(answer, str) and answer in choices:
        text_index = choices.index(answer)
        if ambiguous is not None and answer.isdigit() and 0 <= int(answer) - base < len(choices) \
                and int(answer) - base != text_index:
            ambiguous.append(where)
        answer, named = text_index, True
    elif isinstance(answer, str) and not answer.lstrip("-").isdigit():
        raise TaskFormatError(f"{where}: answer {answer!r} is not one of the choices {choices}"
                              + (f" nor of their labels {labels}" if labels else ""))
    try:
        given = int(answer)
    except (TypeError, ValueError):
        raise TaskFormatError(f"{where}: answer must be a choice index or the choice text, got {answer!r}") from None
    answer = given if named else given - base
    if not 0 <= answer < len(choices):
        hint = f" ({str(given)!r} is a choice's text: write the answer as the string \"{given}\" to mean it)" \
            if str(given) in choices else ""
        if not hint and not named and base == 0 and given == len(choices):
            hint = " (if the answers count the choices from 1, set answer base 1: --answer-base 1)"
        counted = " (counting from 1)" if base and not named else ""
        raise TaskFormatError(f"{where}: answer index {given}{counted} is out of range for {len(choices)} "
                              f"choices{hint}")
    if ambiguous is not None and as_number and not named and str(given) in choices and choices[answer] != str(given):
        ambiguous.append(where)
    return replace(ex, answer=answer)


def gen_example(prompt, targets, where: str) -> Example:
    """A generation example: ``targets`` a list of accepted answers, or one as text (a JSON list in text is read as
    that list, for CSV cells); ``where`` names the example in errors."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise TaskFormatError(f"{where}: the prompt is empty or not text")
    if isinstance(targets, str):
        try:
            parsed = json.loads(targets)
            targets = parsed if isinstance(parsed, list) else [targets]
        except json.JSONDecodeError:
            targets = [targets]
    if not isinstance(targets, (list, tuple)) or not [t for t in targets if str(t).strip()]:
        raise TaskFormatError(f"{where}: a generation example needs at least one non-empty target answer")
    return _shift_space(Example(prompt, targets=tuple(str(t) for t in targets if str(t).strip())))


def _shift_space(ex: Example) -> Example:
    if ex.prompt.endswith(" "):  # one space moves, so the text read stays the task's ("has  a ball" keeps its two)
        return Example(ex.prompt[:-1], tuple(" " + c for c in ex.choices), ex.answer, tuple(" " + t for t in ex.targets))
    if ex.prompt[-1:].isspace():
        return ex
    # "Answer:" + "yes" reads as "Answer: yes"; continuations that already start with a space are kept.
    return Example(ex.prompt, tuple(c if c[:1].isspace() else " " + c for c in ex.choices), ex.answer,
                   tuple(t if t[:1].isspace() else " " + t for t in ex.targets))


def load_task(spec: TaskSpec) -> Task:
    """Load ``spec.source``: a bundled name, a BIG-bench .json (or its folder), a .json array of records, a
    .jsonl/.csv/.parquet file, or ``hf:<dataset>`` (see :func:`laser_core.records.load_hf`).

    Raises:
        TaskFormatError: unknown name, missing file, or malformed content (with file and line).
    """
    from .bigbench import bigbench_task  # they build on this module's examples
    from .records import load_csv, load_hf, load_json_records, load_jsonl, load_parquet

    src = spec.source.strip()
    if src in BUNDLED:
        return bigbench_task(DATA_DIR / BUNDLED[src], spec, name=src)
    if src.startswith("hf:"):
        return load_hf(src, spec)
    path = Path(src).expanduser()
    if not path.exists():
        raise TaskFormatError(f"task not found: {src!r} is not a bundled task ({', '.join(BUNDLED)}) nor an existing file")
    if path.is_dir():
        path = path / "task.json"
        if not path.exists():
            raise TaskFormatError(f"{src} is a folder without a BIG-bench task.json")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = read_json(path)
        if isinstance(data, list):  # records, as JSON Lines holds them one per line
            return load_json_records(path, data, spec)
        return bigbench_task(path, spec, data=data)
    if suffix in (".jsonl", ".ndjson"):
        return load_jsonl(path, spec)
    if suffix in (".csv", ".tsv"):  # the separator is read from the header either way
        return load_csv(path, spec)
    if suffix == ".parquet":
        return load_parquet(path, spec)
    raise TaskFormatError(f"{path.name}: unknown task format {suffix!r}; use .json (BIG-bench, or an array of "
                          "records), .jsonl, .csv/.tsv or .parquet")


def make_splits(task: Task, spec: TaskSpec, warn: bool = True) -> Splits:
    """Shuffle with ``spec.seed`` and cut disjoint parts: test first (stable across calibration sizes),
    then calibration, then validation (``n_val`` or 20% of the task, capped by what remains). Repeated examples
    are dropped first, with a warning unless ``warn`` is False (a caller splitting the same task again).

    With ``spec.shots``, the last that many examples of the shuffled order lead every prompt, solved
    (:func:`laser_core.fewshot.with_shots`), and no split holds them: a task with examples to spare has the
    zero-shot splits, so zero- and few-shot results are on the same questions.

    Raises:
        TaskFormatError: the task has fewer examples than calibration + test (+ shots) need.
    """
    seen: set = set()
    unique = []
    for i, e in enumerate(task.examples):  # a repeated example must not land in two splits
        key = (e.prompt, e.choices, e.targets)
        if key not in seen:
            seen.add(key)
            unique.append(i)
    if warn and len(unique) < len(task):
        log.warning("task %s: %d duplicate examples dropped before splitting", task.name, len(task) - len(unique))
    n = len(unique)
    order = list(unique)
    random.Random(spec.seed).shuffle(order)
    free = n - spec.shots  # the last spec.shots of the order are the solved examples: no split holds them
    if spec.n_calib + 1 > free:
        shots, or_shots = (f" and {spec.shots} few-shot examples", ", or the shots") if spec.shots else ("", "")
        spare = f", e.g. {max(1, free // 2)} to leave the rest for validation and test" if free > 1 else ""
        raise TaskFormatError(f"task {task.name!r} has {n} distinct examples, too few for {spec.n_calib} calibration "
                              f"examples plus at least 1 test example{shots}; lower the calibration size (n_calib) to "
                              f"at most {free - 1}{spare}{or_shots}")
    n_val = spec.n_val if spec.n_val is not None else max(1, round(0.2 * n))
    # small tasks: the test split shrinks first so that validation keeps its share (LASER needs it)
    n_test = max(1, min(spec.n_test, free - spec.n_calib - n_val))
    n_val = min(n_val, free - spec.n_calib - n_test)
    if warn and (n_test < spec.n_test or (spec.n_val is not None and n_val < spec.n_val)):
        log.warning("task %s has %d distinct examples: calibration %d, validation %d (%s asked), held-out test %d "
                    "(%d asked)", task.name, n, spec.n_calib, n_val, spec.n_val or "20%", n_test, spec.n_test)
    test = order[:n_test]
    calib = order[n_test:n_test + spec.n_calib]
    val = order[n_test + spec.n_calib:n_test + spec.n_calib + n_val]  # may be empty: LASER then says so
    if spec.shots:
        from .fewshot import with_shots  # it builds on this module's tasks

        task = with_shots(task, order[free:])
    return Splits(task, spec, tuple(calib), tuple(val), tuple(test))
