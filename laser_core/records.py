"""Tasks held as records with columns: JSON Lines, CSV/TSV, Parquet, a JSON array of records, or a Hugging Face
dataset, read through the column mapping, prompt template and fixed choices of a :class:`TaskSpec`."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from pathlib import Path

from .config import TaskSpec, read_text, split_choices, template_columns
from .errors import TaskFormatError
from .hub import hub_unreachable, offline_mode
from .tasks import Task, gen_example, make_task, marks_its_answer, mc_example

log = logging.getLogger(__name__)


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
            if spec.answer_col not in row and (fixed or not marks_its_answer(choices)):
                raise TaskFormatError(f"{loc}: no answer column {spec.answer_col!r} (columns: {sorted(row)})")
            answer = row.get(spec.answer_col)
            if fixed and isinstance(answer, bool) and len(fixed) == 2:
                answer = int(answer)  # google/boolq's true/false answers: "no|yes" reads false as no, true as yes
            examples.append(mc_example(prompt, choices, answer, loc, ambiguous, spec.answer_base))
        elif row.get(spec.targets_col) not in (None, ""):
            examples.append(gen_example(prompt, row[spec.targets_col], loc))
        else:
            raise TaskFormatError(f"{loc}: neither a choices column {spec.choices_col!r} nor a targets column "
                                  f"{spec.targets_col!r} (columns: {sorted(row)}); set the column mapping")
    if ambiguous:
        log.warning("task %s: %d answers could name two choices, as one choice's text and as another's index "
                    "(first: %s). A string was read as the text, a number as the index; to mean the other, write "
                    "the answer as that choice's text", name, len(ambiguous), ambiguous[0])
    return make_task(name, examples)


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
