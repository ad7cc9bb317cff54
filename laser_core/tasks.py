"""Tasks: examples of one kind (multiple choice or generation), loaders and seeded disjoint splits."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .config import TaskSpec, read_text, split_choices, stable_hash, template_columns
from .errors import ConfigError, TaskFormatError
from .hub import hub_unreachable, offline_mode

log = logging.getLogger(__name__)
DATA_DIR = Path(__file__).resolve().parent / "data" / "bigbench"
BUNDLED: dict[str, str] = {
    "fever": "fever.json",
    "epistemic_reasoning": "epistemic_reasoning.json",
    "qa_wikidata": "qa_wikidata.json",
    "truthful_qa": "truthful_qa_mc.json",
}


# ---- generation: a registry of rules for when a generated answer is right. Each gets the answer (the generated
# text up to its first newline) and one accepted answer, both stripped of surrounding spaces and lowercased ----
MATCH_RULES: dict[str, Callable[[str, str], bool]] = {
    "contains": lambda answer, target: target in answer,  # LASER's: "1" is found in "10", "a" in "paris"
    "word": lambda answer, target: re.search(rf"(?<!\w){re.escape(target)}(?!\w)", answer) is not None,
    "starts": lambda answer, target: re.match(rf"{re.escape(target)}(?!\w)", answer) is not None,
    "exact": lambda answer, target: answer == target,  # the whole line; a trailing "." already fails it
}
MATCH_HELP = ("contains: an accepted answer occurs in the generated line (LASER's rule, the default); word: it occurs "
              "there as whole words; starts: the line starts with it, as whole words; exact: the line is an accepted "
              "answer. Case and surrounding spaces are ignored")


def match_rule(name: str) -> Callable[[str, str], bool]:
    """The answer-match rule called ``name`` (see :data:`MATCH_RULES`)."""
    if name not in MATCH_RULES:
        raise ConfigError(f"unknown answer match {name!r}; known: {', '.join(MATCH_RULES)}")
    return MATCH_RULES[name]


def answer_matches(answer: str, targets, rule: str = "contains") -> bool:
    """Whether the generated ``answer`` is right under ``rule``: it matches one of ``targets``, ignoring case and
    surrounding spaces."""
    test = match_rule(rule)
    answer = answer.strip().lower()
    return any(test(answer, t.strip().lower()) for t in targets)


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
    digest: str  # hash of the examples: part of every cache key

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


def _make_task(name: str, examples: list[Example]) -> Task:
    if not examples:
        raise TaskFormatError(f"task {name!r} has no examples")
    kinds = {e.kind for e in examples}
    if len(kinds) > 1:
        raise TaskFormatError(f"task {name!r} mixes multiple-choice and generation examples; split it in two")
    digest = hashlib.sha256(json.dumps([[e.prompt, e.choices, e.answer, e.targets] for e in examples]).encode()).hexdigest()[:16]
    return Task(name, kinds.pop(), tuple(examples), digest)


def _marks_its_answer(choices) -> bool:
    """Do ``choices`` carry their own answer, as ``{"choices": [...], "labels": [0, 1, ...]}`` does?"""
    return isinstance(choices, dict) and isinstance(choices.get("choices"), (list, tuple)) \
        and isinstance(choices.get("labels"), (list, tuple))


def _mc_example(prompt, choices, answer, where: str, ambiguous: list | None = None, base: int = 0) -> Example:
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
    if _marks_its_answer(choices):  # TruthfulQA's mc1_targets on the hub: {"choices": [...], "labels": [0, 1, 0]}
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


def _gen_example(prompt, targets, where: str) -> Example:
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


def read_json(path: Path):
    """A JSON file's content, or TaskFormatError naming the file and where it stops parsing."""
    try:
        return json.loads(read_text(path, TaskFormatError))
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e


def load_bigbench(path: str | Path, name: str | None = None, data: dict | None = None) -> Task:
    """Read a BIG-bench ``task.json`` (``target_scores`` -> multiple choice, ``target`` -> generation), zero-shot.

    The prompt is built as BIG-bench's JsonTask builds it: ``task_prefix + example_input_prefix + input``, then, for
    multiple choice with ``append_choices_to_input`` (true unless the file says false), the choices each after
    ``choice_prefix`` in BIG-bench's order, then ``example_output_prefix``. Unset prefixes take BIG-bench's
    defaults ("\\nQ: ", "\\n  choice: ", "\\nA: "); a null one is empty. The answer is the choice of highest
    score (the first of equals).

    ``data``: the file's content where the caller has read it already.

    ``append_choices_to_input`` is read as BIG-bench reads it, by truth value (seven of its tasks write the text
    "false", which BIG-bench takes as true), with a warning when it is not true or false.

    Raises:
        TaskFormatError: not JSON, no ``examples`` list, a prefix that is not text, or an example without an
            input, without targets, or whose scores name no best choice.
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
            examples.append(_mc_example(f"{pre}{inp}{body}{out}", choices,
                                        next(j for j, c in enumerate(choices) if scores[c] == best), where))
        elif "target" in ex:
            target = ex["target"]  # text is one answer as written ("[]" included), not JSON to parse
            examples.append(_gen_example(f"{pre}{inp}{ex['input']}{out}", [target] if isinstance(target, str) else target,
                                         where))
        else:
            raise TaskFormatError(f"{where}: has neither 'target_scores' nor 'target'")
    return _make_task(name or data.get("name", path.stem), examples)


def _prompt_of(row: dict, spec: TaskSpec, template: str, columns: list[str], loc: str) -> str:
    """The prompt of ``row``: its prompt column, or ``template`` (``spec.prompt_template`` with a typed backslash-n
    or backslash-t read as a line break or tab) filled from its ``columns``."""
    if not template:
        if spec.prompt_col not in row:
            raise TaskFormatError(f"{loc}: no prompt column {spec.prompt_col!r} (columns: {sorted(row)}); "
                                  "set the column mapping or a prompt template")
        return row[spec.prompt_col]
    missing = [c for c in columns if c not in row]
    if missing:
        raise TaskFormatError(f"{loc}: the prompt template names {', '.join(map(repr, missing))}, not a column "
                              f"(columns: {sorted(row)})")
    try:
        return template.format_map(row)
    except (LookupError, AttributeError, TypeError, ValueError) as e:
        raise TaskFormatError(f"{loc}: cannot fill the prompt template {spec.prompt_template!r}: "
                              f"{type(e).__name__}: {e}") from None


def _records_to_task(name: str, rows, spec: TaskSpec, where) -> Task:
    examples, ambiguous = [], []
    template = spec.prompt_template.replace("\\n", "\n").replace("\\t", "\t")  # read once for every row
    columns = [f.split("[")[0] for f in template_columns(template)] if template else []
    fixed = split_choices(spec.fixed_choices) if spec.fixed_choices else None
    choice_cols = [c.strip() for c in spec.choices_col.split(",") if c.strip()] if "," in spec.choices_col else []
    if isinstance(fixed, list):  # typed by hand: "no | yes" means "no" and "yes"
        fixed = [c.strip() if isinstance(c, str) else c for c in fixed]
    for n, row in rows:
        loc = where(n)
        prompt = _prompt_of(row, spec, template, columns, loc)
        if choice_cols and not fixed:  # one choice per column (PIQA's sol1, sol2)
            missing = [c for c in choice_cols if c not in row]
            if missing:
                raise TaskFormatError(f"{loc}: no choices column {', '.join(map(repr, missing))} (columns: {sorted(row)})")
        choices = fixed or ([row[c] for c in choice_cols] if choice_cols else row.get(spec.choices_col))
        if choices not in (None, ""):
            if spec.answer_col not in row and (fixed or not _marks_its_answer(choices)):
                raise TaskFormatError(f"{loc}: no answer column {spec.answer_col!r} (columns: {sorted(row)})")
            answer = row.get(spec.answer_col)
            if fixed and isinstance(answer, bool) and len(fixed) == 2:
                answer = int(answer)  # google/boolq's true/false answers: "no|yes" reads false as no, true as yes
            examples.append(_mc_example(prompt, choices, answer, loc, ambiguous, spec.answer_base))
        elif row.get(spec.targets_col) not in (None, ""):
            examples.append(_gen_example(prompt, row[spec.targets_col], loc))
        else:
            raise TaskFormatError(f"{loc}: neither a choices column {spec.choices_col!r} nor a targets column "
                                  f"{spec.targets_col!r} (columns: {sorted(row)}); set the column mapping")
    if ambiguous:
        log.warning("task %s: %d answers could name two choices, as one choice's text and as another's index "
                    "(first: %s). A string was read as the text, a number as the index; to mean the other, write "
                    "the answer as that choice's text", name, len(ambiguous), ambiguous[0])
    return _make_task(name, examples)


def load_jsonl(path: str | Path, spec: TaskSpec) -> Task:
    """Read JSON Lines: one object per line with the columns named in ``spec``."""
    path = Path(path)
    rows = []
    for n, line in enumerate(read_text(path, TaskFormatError).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"{path.name}: line {n} is not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise TaskFormatError(f"{path.name}: line {n} is not a JSON object")
        rows.append((n, obj))
    if not rows:
        raise TaskFormatError(f"{path.name}: the file is empty")
    return _records_to_task(path.stem, rows, spec, lambda n: f"{path.name}: line {n}")


def load_json_records(path: Path, records: list, spec: TaskSpec) -> Task:
    """A .json file holding an array of objects (as ``pandas.DataFrame.to_json(orient="records")`` writes): the same
    columns as JSON Lines, all in one array."""
    if not records:
        raise TaskFormatError(f"{path.name}: the array holds no records")
    for n, obj in enumerate(records, start=1):
        if not isinstance(obj, dict):
            raise TaskFormatError(f"{path.name}: record {n} is not a JSON object")
    return _records_to_task(path.stem, enumerate(records, start=1), spec, lambda n: f"{path.name}: record {n}")


def load_csv(path: str | Path, spec: TaskSpec) -> Task:
    """Read CSV with a header row; choices as a JSON list or 'a|b|c', answer as the choice text or its index. The
    separator is the header's: a comma, or a semicolon (spreadsheets set to a decimal comma write those) or a tab."""
    path = Path(path)
    text = read_text(path, TaskFormatError)
    if not text.strip():
        raise TaskFormatError(f"{path.name}: the file is empty")
    try:
        separator = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t").delimiter
    except csv.Error:  # a header of one column
        separator = ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=separator)  # a quoted field keeps its line breaks
    rows = []
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
            raise TaskFormatError(f"{path.name}: line {reader.line_num} has {fields} fields but the header has "
                                  f"{len(reader.fieldnames)}")
        rows.append((reader.line_num, row))
    if not rows:
        raise TaskFormatError(f"{path.name}: the file has a header but no rows")
    return _records_to_task(path.stem, rows, spec, lambda n: f"{path.name}: line {n}")


def load_parquet(path: Path, spec: TaskSpec) -> Task:
    """Read a Parquet file (the hub's own format for datasets): one row per example, the same columns as JSON Lines."""
    import pyarrow.parquet as pq  # installed with datasets

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file it cannot read
        raise TaskFormatError(f"{path.name}: not a readable Parquet file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from e
    if not rows:
        raise TaskFormatError(f"{path.name}: the file has no rows")
    return _records_to_task(path.stem, enumerate(rows, start=1), spec, lambda n: f"{path.name}: row {n}")


HF_FORMAT = "hf:<dataset>[:<split>] or hf:<dataset>:<config>:<split>"


def parse_hf(ref: str) -> tuple[str, str | None, str]:
    """(dataset, config or None, split) of ``hf:<dataset>[:<split>]`` or ``hf:<dataset>:<config>:<split>``.

    Raises:
        TaskFormatError: no dataset name, an empty part, or more than three parts.
    """
    parts = ref.removeprefix("hf:").split(":")
    if len(parts) > 3 or not all(p.strip() for p in parts):
        raise TaskFormatError(f"{ref!r} is not a Hugging Face dataset reference: write {HF_FORMAT} "
                              "(e.g. hf:cais/mmlu:all:test)")
    parts = [p.strip() for p in parts]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else "train"


def load_hf(ref: str, spec: TaskSpec) -> Task:
    """Read a Hugging Face dataset (already in the local cache, or reachable): ``hf:<dataset>[:<split>]``, or
    ``hf:<dataset>:<config>:<split>`` for a dataset with several configs (subsets), e.g. ``hf:cais/mmlu:all:test``.

    Raises:
        TaskFormatError: not found (naming whether the hub could be asked), a config or split that the dataset
            does not have (with the ones it has, as ``datasets`` lists them), or rows that do not fit the mapping.
    """
    import datasets

    name, config, split = parse_hf(ref)
    what = f"Hugging Face dataset {name!r}" + (f" (config {config!r}, split {split!r})" if config else
                                                f" (split {split!r})")
    offline = hub_unreachable()
    try:
        with offline_mode() if offline else contextlib.nullcontext():
            ds = datasets.load_dataset(name, config, split=split)
    except ValueError as e:  # found, but no such config or split (or a config is needed): datasets names the choices
        hint = (f"; name one as hf:{name}:<config>:{split}" if "config" in str(e).lower() else "")
        raise TaskFormatError(f"could not load {what}: {' '.join(str(e).split())[:400]}{hint}") from e
    except OSError as e:  # not found, not cached, or no network
        why = f"cannot be downloaded: {offline}" if offline else "could not be downloaded"
        raise TaskFormatError(f"could not load {what}: it is not in the local cache and {why} "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    except Exception as e:  # noqa: BLE001 - a dataset's files fail to parse in many ways
        raise TaskFormatError(f"could not read {what}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    label = name.rstrip("/").split("/")[-1] + (f"-{config}" if config else "")
    return _records_to_task(label, enumerate(ds), spec, lambda n: f"{name}: row {n}")


def _bigbench_task(path: Path, spec: TaskSpec, name: str | None = None, data: dict | None = None) -> Task:
    """:func:`load_bigbench`, refusing the column-reading settings, which a task.json has no columns for."""
    if spec.prompt_template or spec.fixed_choices:
        what = "a prompt template" if spec.prompt_template else "fixed choices"
        raise TaskFormatError(f"{what} applies to JSONL, CSV, JSON-array, Parquet and hf: tasks (their columns); "
                              f"{spec.source!r} is a BIG-bench task, whose prompts and choices its task.json defines: "
                              f"leave {what} empty")
    return load_bigbench(path, name=name, data=data)


def load_task(spec: TaskSpec) -> Task:
    """Load ``spec.source``: a bundled name, a BIG-bench .json (or its folder), a .json array of records, a
    .jsonl/.csv/.parquet file, or ``hf:<dataset>`` (see :func:`load_hf`).

    Raises:
        TaskFormatError: unknown name, missing file, or malformed content (with file and line).
    """
    src = spec.source.strip()
    if src in BUNDLED:
        return _bigbench_task(DATA_DIR / BUNDLED[src], spec, name=src)
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
        return _bigbench_task(path, spec, data=data)
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

    Raises:
        TaskFormatError: the task has fewer examples than calibration + test need.
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
    if spec.n_calib + 1 > n:
        raise TaskFormatError(f"task {task.name!r} has {n} distinct examples, too few for {spec.n_calib} calibration "
                              f"examples plus at least 1 test example; lower the calibration size (n_calib) to at most "
                              f"{n - 1}, e.g. {max(1, n // 2)} to leave the rest for validation and test")
    n_val = spec.n_val if spec.n_val is not None else max(1, round(0.2 * n))
    # small tasks: the test split shrinks first so that validation keeps its share (LASER needs it)
    n_test = max(1, min(spec.n_test, n - spec.n_calib - n_val))
    n_val = min(n_val, n - spec.n_calib - n_test)
    if warn and (n_test < spec.n_test or (spec.n_val is not None and n_val < spec.n_val)):
        log.warning("task %s has %d distinct examples: calibration %d, validation %d (%s asked), held-out test %d "
                    "(%d asked)", task.name, n, spec.n_calib, n_val, spec.n_val or "20%", n_test, spec.n_test)
    test = order[:n_test]
    calib = order[n_test:n_test + spec.n_calib]
    val = order[n_test + spec.n_calib:n_test + spec.n_calib + n_val]  # may be empty: LASER then says so
    return Splits(task, spec, tuple(calib), tuple(val), tuple(test))
