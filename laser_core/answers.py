"""Generation answers: how one is cut from the text the model decoded (:class:`AnswerFormat`: its first line, or a
BIG-bench file's stop string and regex) and the rules that say when it is right (:data:`MATCH_RULES`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import ConfigError, TaskFormatError

if TYPE_CHECKING:
    from .tasks import Task

# ---- a registry of rules for when a generated answer is right. Each gets the answer (the generated text's first
# line, or what the task's AnswerFormat cuts) and one accepted answer, both stripped of spaces and lowercased ----
MATCH_RULES: dict[str, Callable[[str, str], bool]] = {
    "contains": lambda answer, target: target in answer,  # LASER's: "1" is found in "10", "a" in "paris"
    "word": lambda answer, target: re.search(rf"(?<!\w){re.escape(target)}(?!\w)", answer) is not None,
    "starts": lambda answer, target: re.match(rf"{re.escape(target)}(?!\w)", answer) is not None,
    "exact": lambda answer, target: answer == target,  # the whole answer; a trailing "." already fails it
}
MATCH_HELP = ("contains: an accepted answer occurs in the generated answer (LASER's rule, the default); word: it occurs "
              "there as whole words; starts: the answer starts with it, as whole words; exact: the answer is an "
              "accepted one (BIG-bench's exact match). The generated answer is the first line of the text, or what a "
              "BIG-bench file's stop_string and output_regex cut from it. Case and surrounding spaces are ignored")


def match_rule(name: str) -> Callable[[str, str], bool]:
    """The answer-match rule called ``name`` (see :data:`MATCH_RULES`)."""
    if name not in MATCH_RULES:
        raise ConfigError(f"unknown answer match {name!r}; known: {', '.join(MATCH_RULES)}")
    return MATCH_RULES[name]


@dataclass(frozen=True)
class AnswerFormat:
    """How a generation task's answer is cut from the text the model decoded, before it is matched: by default its
    first line; a BIG-bench task file may set ``stop_string`` and ``output_regex``, which are then applied as
    BIG-bench applies them (``bigbench.models.model_utils.postprocess_output``): the text up to and including the
    first stop string (unless the text starts with it), then the first match of the regex (its group where it has
    one), or nothing where the regex finds none. An empty setting cuts nothing: ``output_regex ""`` keeps the whole
    text (two BIG-bench tasks write it so).

    Raises:
        TaskFormatError: a setting that is not text, a regex that does not compile or has more than one group.
    """

    stop_string: str | None = None
    output_regex: str | None = None

    def __post_init__(self) -> None:
        for name in ("stop_string", "output_regex"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TaskFormatError(f"{name!r} must be text, got {value!r}")
        if self.output_regex is not None:
            try:
                groups = re.compile(self.output_regex).groups
            except re.error as e:
                raise TaskFormatError(f"'output_regex' {self.output_regex!r} is not a regular expression: {e}") from None
            if groups > 1:
                raise TaskFormatError(f"'output_regex' {self.output_regex!r} has {groups} groups; it may have at most "
                                      "one (write the others as non-capturing: (?:...))")

    @property
    def is_set(self) -> bool:
        return self.stop_string is not None or self.output_regex is not None

    def answer(self, text: str) -> str:
        """The answer in ``text``, the decoded continuation as it came (leading space and newlines included)."""
        if not self.is_set:
            text = text.strip()
            return text.split("\n")[0] if text else ""
        if self.stop_string:
            at = text.find(self.stop_string)
            if at > 0:  # BIG-bench's rule: a text that starts with the stop string is kept whole
                text = text[:at + len(self.stop_string)]
        if self.output_regex:
            text = next(iter(re.findall(self.output_regex, text)), "")
        return text.strip()

    def describe(self) -> str:
        """The settings in words ("" when none is set): the stop string as Python writes it (a newline shows as
        ``'\\n'``), the regex as it is."""
        return " and ".join(part for part in (
            f"stop_string {self.stop_string!r}" if self.stop_string is not None else "",
            f"output_regex {self.output_regex or repr('') + ' (the whole text)'}" if self.output_regex is not None
            else "") if part)


FIRST_LINE = AnswerFormat()


def answer_rule_words(task: Task, match: str) -> str:
    """How a generation task's answers are read and matched, in words for the CLI and the pages ("" for multiple
    choice)."""
    if task.kind != "gen":
        return ""
    cut = task.answer_format.describe()
    how = f"cut by the task file's {cut}, then " if cut else ""
    return f"answers {how}matched by the '{match}' rule"


def answer_matches(answer: str, targets, rule: str = "contains") -> bool:
    """Whether the generated ``answer`` is right under ``rule``: it matches one of ``targets``, ignoring case and
    surrounding spaces."""
    test = match_rule(rule)
    answer = answer.strip().lower()
    return any(test(answer, t.strip().lower()) for t in targets)
