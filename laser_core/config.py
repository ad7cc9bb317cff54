"""Frozen, validated configs: one dataclass per concept, serialised as sorted JSON for hashing."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, LaserError, TaskFormatError

ALGO_VERSION = 2  # bump when a cached quantity would change meaning (2: choices tokenised after their prompt)
PAPER_RHOS = (0.9, 0.75, 0.5, 0.25, 0.1, 0.05, 0.01, 0.005)  # LASER's grid: 10%..99.5% of rank removed
PAPER_KS = (1, 2, 4, 8)
CONTIGUOUS = "contiguous"  # the paper's row blocks (laser_core.grouping holds every grouping)


def read_text(path: Path, error: type[LaserError]) -> str:
    """A user's text file (UTF-8; a leading byte-order mark, as some editors and spreadsheet exports write, is
    dropped), or ``error`` naming the file where it cannot be read or is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path.name} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                    "save it as UTF-8") from e
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from e


def read_json(path: Path):
    """A JSON file's content, or TaskFormatError naming the file and where it stops parsing."""
    try:
        return json.loads(read_text(path, TaskFormatError))
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the text every hash is taken of. A dataclass field marked
    ``OMIT_DEFAULT`` is left out while it holds its default, so adding one keeps every existing key."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), default=list)


OMIT_DEFAULT = {"omit_default": True}  # a field's metadata: not serialised while it holds its default


def _plain(obj: Any) -> Any:
    """``obj`` with its dataclasses (nested in lists, tuples and dicts too) as dicts, as ``dataclasses.asdict``
    makes them, less the ``OMIT_DEFAULT`` fields that hold their default."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def stable_hash(obj: Any, length: int = 16) -> str:
    """Short sha256 of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def check_rho(rho: float) -> float:
    """Return ``rho`` as float or raise ``ConfigError`` if it is not in (0, 1]."""
    if not isinstance(rho, (int, float)) or math.isnan(rho) or not 0.0 < rho <= 1.0:
        raise ConfigError(f"rho must be in (0, 1], got {rho}")
    return float(rho)


def check_k(k: int, rows: int | None = None) -> int:
    """Return ``k`` or raise ``ConfigError`` if it is not a positive integer no larger than ``rows``."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ConfigError(f"K (number of row blocks) must be a positive integer, got {k}")
    if rows is not None and k > rows:
        raise ConfigError(f"K={k} is larger than the matrix's {rows} rows; choose K <= {rows}")
    return k


def check_one_per_matrix(edits) -> list:
    """Return ``edits`` as a list, or raise ``ConfigError`` if two of them reduce the same matrix (each is
    computed from the unedited weight, so one would silently replace the other)."""
    edits = list(edits)
    names = [e.name for e in edits]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"two edits reduce the same matrix: {', '.join(twice)}; keep one edit per matrix")
    return edits


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and where to run it."""

    source: str = "demo"  # "demo", a local HF folder, a .gguf file, or a hub id already in the local cache
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "float32"  # "float32", "bfloat16", "float16"; on CPU keep float32 (bf16 matmul is ~100x slower)

    def __post_init__(self) -> None:
        if not str(self.source).strip():
            raise ConfigError("model source is empty: give 'demo', a folder, a .gguf file or a hub id")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be one of float32, bfloat16, float16, got {self.dtype!r}")


@dataclass(frozen=True)
class TaskSpec:
    """Which task, how to read it, and how to split it into disjoint seeded parts."""

    source: str = "fever"  # a bundled name, a BIG-bench task.json, a .jsonl/.csv/.parquet/.json file, or "hf:<dataset>[:...]"
    n_calib: int = 100  # calibration examples: gradients and C2I candidate evaluation
    n_test: int = 300  # held-out test examples: reported, never searched on
    n_val: int | None = None  # validation examples for the LASER baseline; None = 20% of the task
    seed: int = 0  # shuffles the examples before splitting
    prompt_col: str = "prompt"  # column mapping for JSONL/CSV/HF data
    choices_col: str = "choices"  # or several columns, one choice each: "sol1,sol2" (PIQA), "option1,option2"
    answer_col: str = "answer"
    targets_col: str = "targets"
    max_new_tokens: int = 12  # generation tasks: greedy decoding length
    prompt_template: str = ""  # JSONL/CSV/HF: the prompt built from columns, e.g. "Question: {question}\nAnswer:"
    #                            (\n typed as backslash-n is a line break); "": the prompt column as it is
    fixed_choices: str = ""  # JSONL/CSV/HF: the same choices for every row, "no|yes" (BoolQ, SST-2): the answer
    #                          column is an index or text of these; "": each row's choices column
    answer_base: int = 0  # the index an answer column gives the first choice: 0, or 1 where a set counts from 1
    #                       (Winogrande's "1"/"2", Social IQa's "1"-"3")
    match: str = "contains"  # generation tasks: when an answer is right, a name in answers.MATCH_RULES (contains,
    #                          LASER's; word; starts; exact)
    shots: int = 0  # few-shot: solved examples drawn (with the seed) from the task, kept out of every split and put
    #                 before every prompt; 0: zero-shot, as LASER and the paper evaluate

    def __post_init__(self) -> None:
        if not str(self.source).strip():
            raise ConfigError("task source is empty: give a bundled name, a file or hf:<dataset>")
        for name in ("n_calib", "n_test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_val is not None and self.n_val < 1:
            raise ConfigError(f"n_val must be >= 1 or None, got {self.n_val}")
        if self.answer_base not in (0, 1):
            raise ConfigError(f"answer_base must be 0 or 1 (the index of the first choice), got {self.answer_base!r}")
        if self.shots < 0:
            raise ConfigError(f"shots must be >= 0 (0: zero-shot), got {self.shots}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        from .answers import match_rule  # the registry lives beside the answer formats

        match_rule(self.match)
        if self.prompt_template:
            template_columns(self.prompt_template)
        if self.fixed_choices and len(split_choices(self.fixed_choices)) < 2:
            raise ConfigError(f"fixed choices {self.fixed_choices!r} must be at least 2, separated by | (e.g. no|yes) "
                              "or as a JSON list")


def split_choices(text: str) -> list | dict:
    """Choices written as text: a JSON list ('["no", "yes"]') or object ({"text": [...], "label": [...]}), else
    separated by | ('no|yes')."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return text.split("|")
    return parsed if isinstance(parsed, (list, dict)) else text.split("|")


def template_columns(template: str) -> list[str]:
    """The columns a prompt template names, in order: "Q: {question}\\nA:" -> ["question"].

    Raises:
        ConfigError: it does not parse as a format string, names no column, or has a positional field ("{}").
    """
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"prompt template {template!r} does not parse ({e}); write a column as {{name}} and a "
                          "literal brace as {{ or }}") from None
    if not fields or any(not f.strip() or f.strip().isdigit() for f in fields):
        raise ConfigError(f"prompt template {template!r} must name its columns, e.g. 'Question: {{question}}\\nAnswer:'")
    for field in fields:  # "{question.upper}" would print "<built-in method upper ...>" into every prompt
        if "." in re.sub(r"\[[^\]]*\]", "", field):  # a dot outside an item's brackets reads an attribute
            raise ConfigError(f"prompt template {template!r}: {{{field}}} reads an attribute, which no column has; "
                              "name a column as {name}, or an item of one as {name[key]} or {name[0]}")
    return fields


@dataclass(frozen=True)
class Edit:
    """One rank reduction: keep a fraction ``rho`` of the rank of each of ``k`` row blocks (contiguous, or as
    ``grouping`` groups the rows: see :mod:`laser_core.grouping`)."""

    name: str  # parameter name, e.g. "model.layers.3.mlp.up_proj.weight"
    k: int = 1
    rho: float = 0.1
    grouping: str = dataclasses.field(default=CONTIGUOUS, metadata=OMIT_DEFAULT)  # how rows form the K blocks

    def __post_init__(self) -> None:
        check_k(self.k)
        check_rho(self.rho)
        from .grouping import check_grouping  # the registry lives beside the groupings

        check_grouping(self.grouping)
        if self.k == 1:  # one block of every row under any grouping: one edit, with one cache key
            object.__setattr__(self, "grouping", CONTIGUOUS)

    @property
    def blocks(self) -> tuple[str, int, str]:
        """What its SVD factors depend on: (matrix, K, grouping); every rho of it truncates the same factors."""
        return self.name, self.k, self.grouping

    @property
    def label(self) -> str:
        """``name K=k rho=r``, and its grouping where not contiguous: how logs and progress lines name it."""
        return f"{self.name} K={self.k} rho={self.rho:g}" + (f" ({self.grouping})" if self.grouping != CONTIGUOUS else "")

    @classmethod
    def of(cls, doc: dict) -> "Edit":
        """The edit a dict describes (a cached result, a report's row, a recipe's edit): name, k, rho and, where it
        is not contiguous, grouping."""
        return cls(doc["name"], int(doc["k"]), float(doc["rho"]), doc.get("grouping") or CONTIGUOUS)


@dataclass(frozen=True)
class SearchConfig:
    """Settings of a C2I search or a LASER sweep."""

    method: str = "c2i"  # "c2i" (gradient-selected) or "laser" (brute force)
    score: str = "paper"  # c2i: the score that ranks matrices (see gradients.SCORES)
    q: int = 5  # c2i: how many top-scored matrices to try
    ks: tuple[int, ...] = PAPER_KS  # c2i: block counts K
    rhos: tuple[float, ...] = PAPER_RHOS  # fraction of rank kept per block
    tail_fraction: float = 0.9  # "paper" score: trailing share of the spectrum that is summed
    layers: tuple[int, ...] | None = None  # laser: layers to sweep (None = all)
    types: tuple[str, ...] | None = None  # laser: matrix types to sweep (None = all)
    early_stop: bool = False  # stop a candidate once it cannot beat the best accuracy (exact)
    prefix_reuse: bool = True  # run only from the edited matrix on, from cached hidden states (exact)
    # memory on the model's device for cached hidden states and outputs; least recently used layers are dropped
    prefix_budget_mb: int = 2048
    grouping: str = dataclasses.field(default=CONTIGUOUS, metadata=OMIT_DEFAULT)  # c2i: how rows form K blocks
    # candidates of one (matrix, K) evaluated together in one forward (exact); 0: auto (8 on a GPU, 1 on a CPU)
    stack: int = dataclasses.field(default=0, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        if self.method not in ("c2i", "laser"):
            raise ConfigError(f"method must be 'c2i' or 'laser', got {self.method!r}")
        from .gradients import SCORES  # registry lives beside the score functions

        if self.score not in SCORES:
            raise ConfigError(f"unknown score {self.score!r}; known scores: {', '.join(sorted(SCORES))}")
        if self.q < 1:
            raise ConfigError(f"q (matrices to try) must be >= 1, got {self.q}")
        from .grouping import check_grouping

        check_grouping(self.grouping)
        if not self.ks:
            raise ConfigError("the K grid is empty: give at least one block count, e.g. 1")
        if not self.rhos:
            raise ConfigError("the rho grid is empty: give at least one value in (0, 1]")
        for k in self.ks:
            check_k(k)
        for r in self.rhos:
            check_rho(r)
        if self.stack < 0:
            raise ConfigError(f"stack must be >= 0 (0: auto, 1: one candidate at a time), got {self.stack}")
        if self.prefix_budget_mb < 0:
            raise ConfigError(f"prefix_budget_mb must be >= 0, got {self.prefix_budget_mb}")
        if not 0.0 < self.tail_fraction <= 1.0:
            raise ConfigError(f"tail_fraction must be in (0, 1], got {self.tail_fraction}")
        if self.method == "c2i" and (self.layers is not None or self.types is not None):
            raise ConfigError("layers and types choose the matrices of a LASER sweep; a C2I search picks its q "
                              "matrices by score among all of them (leave layers and types unset)")
        # grids as tuples of one type, each value once (a repeated value would be evaluated, and cached, twice)
        object.__setattr__(self, "ks", tuple(dict.fromkeys(int(k) for k in self.ks)))
        object.__setattr__(self, "rhos", tuple(dict.fromkeys(float(r) for r in self.rhos)))
        if self.method == "laser" and self.grouping != CONTIGUOUS:
            raise ConfigError(f"a LASER sweep reduces whole matrices (K=1), so there are no row blocks to group "
                              f"({self.grouping!r}); a C2I search takes a row grouping")
        if max(self.ks) == 1:  # one block of every row under any grouping: one configuration, one cached report
            object.__setattr__(self, "grouping", CONTIGUOUS)
        # a sweep's layers and types: sorted too, as their order changes nothing (the sweep goes in model order), so
        # that --types up,down and a dashboard's "down, up" are one configuration, with one cached report
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        if self.types is not None:
            object.__setattr__(self, "types", tuple(sorted(set(self.types))))


def to_dict(obj: Any) -> dict:
    """Plain dict of a config dataclass (JSON-ready)."""
    return json.loads(canonical_json(obj))
