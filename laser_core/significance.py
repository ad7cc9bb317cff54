"""Is a held-out change real? A paired comparison of two evaluations of the same questions.

The base model and an edited one answer the same held-out questions, so their accuracies are paired: what
counts is how many questions the edit fixed (wrong before, right after) and how many it broke. The McNemar
test asks how likely a split of the changed questions at least this uneven would be if fixing and breaking
were equally likely (a fair coin over the changed questions); we use its mid-p form, which Fagerland, Lydersen
and Laake (2013) recommend over the exact one (too cautious) and the asymptotic one (wrong for few changes). The
95% interval of the accuracy change is Newcombe's (1998) hybrid score interval for paired proportions (Wilson
intervals of both accuracies, combined with their correlation), which keeps its coverage at the sizes used here
(100-300 questions) where the textbook Wald interval does not. Both agree with the values published for them
(``tests/test_math.py``).

Only a split the search never chose on gives a fair test: the best of many candidates on the calibration split
looks better there than it is, so these numbers are for held-out evaluations. Each test holds for one change
looked at alone; where several are read together (a table of tasks x methods, a list of candidates tested on
held-out data), :func:`holm` says which of them stay real as a family.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Sequence

from .errors import ConfigError

ALPHA = 0.05  # the level at which a change is called real
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class PairedChange:
    """Two evaluations of the same ``n`` questions: accuracies, questions fixed and broken, the change's 95%
    interval (``low``, ``high``) and the McNemar mid-p value."""

    n: int
    fixed: int  # wrong before, right after
    broken: int  # right before, wrong after
    before: float
    after: float
    low: float
    high: float
    p_value: float

    @property
    def change(self) -> float:
        return self.after - self.before

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def verdict(self) -> str:
        """'a real gain', 'a real loss' (p < 0.05) or 'within noise'."""
        if not self.significant:
            return "within noise"
        return "a real gain" if self.change > 0 else "a real loss"

    def summary(self) -> str:
        """One line: '+0.017 (95% CI -0.026 to +0.060; 31 fixed, 26 broken of 300; McNemar p = 0.60): within noise'."""
        return (f"{self.change:+.3f} (95% CI {self.low:+.3f} to {self.high:+.3f}; {self.fixed} fixed, {self.broken} "
                f"broken of {self.n}; McNemar {p_text(self.p_value)}): {self.verdict()}")

    def to_dict(self) -> dict:
        return {**asdict(self), "change": self.change, "significant": self.significant}

    @classmethod
    def from_dict(cls, d: dict) -> "PairedChange":
        """The change :meth:`to_dict` wrote (a recipe's ``held_out_change``), its derived keys left aside."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def p_text(p: float) -> str:
    """A p-value as papers print it: 'p = 0.035' (two significant digits below 0.1), 'p < 0.001' below that."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}" if p < 0.1 else f"p = {p:.2f}"


def paired_change(before: Sequence[bool], after: Sequence[bool]) -> PairedChange:
    """Compare per-question outcomes ``before`` (e.g. the base model) and ``after`` (an edit) on the same questions.

    Raises:
        ConfigError: the two lists differ in length (not the same questions) or are empty.
    """
    if len(before) != len(after):
        raise ConfigError(f"cannot pair evaluations of {len(before)} and {len(after)} questions: not the same split")
    if not before:
        raise ConfigError("cannot compare evaluations of no questions")
    n = len(before)
    both = sum(1 for b, a in zip(before, after) if b and a)
    fixed = sum(1 for b, a in zip(before, after) if a and not b)
    broken = sum(1 for b, a in zip(before, after) if b and not a)
    low, high = newcombe_interval(both, fixed, broken, n - both - fixed - broken)
    return PairedChange(n, fixed, broken, (both + broken) / n, (both + fixed) / n, low, high,
                        mcnemar_midp(fixed, broken))


def change_between(before: dict | None, after: dict | None) -> PairedChange | None:
    """The paired change from evaluation ``before`` to ``after`` (result dicts with per-question ``correct``), or
    None where either is missing, stopped early, or not of the same questions."""
    docs = (before, after)
    if any(d is None or d.get("stopped_early") or not d.get("correct") for d in docs) \
            or len(before["correct"]) != len(after["correct"]):
        return None
    return paired_change(before["correct"], after["correct"])


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Which of several tests stay significant read together: Holm's (1979) step-down correction, which keeps the
    chance of any false "real" among them below ``alpha`` (as Bonferroni does, and it never keeps fewer).

    The smallest p must be below alpha/m, the next below alpha/(m-1), and so on; the first that is not stops it.
    """
    keep = [False] * len(p_values)
    for rank, i in enumerate(sorted(range(len(p_values)), key=lambda j: p_values[j])):
        if not p_values[i] < alpha / (len(p_values) - rank):
            break
        keep[i] = True
    return keep


def family_summary(tests: Sequence[tuple[str, float]]) -> str:
    """What of several changes, (name, p) each, stays beyond noise read together (:func:`holm`), in a sentence."""
    kept = [name for (name, _), k in zip(tests, holm([p for _, p in tests])) if k]
    verdict = f"{', '.join(kept)} {'stays' if len(kept) == 1 else 'stay'}" if kept else "none stays"
    return (f"Read together, as {len(tests)} tests (Holm's correction: at most a {ALPHA:.0%} chance that any of them "
            f"is called real by chance): {verdict} beyond noise.")


def mcnemar_midp(fixed: int, broken: int) -> float:
    """Two-sided McNemar mid-p value: twice the binomial(fixed + broken, 1/2) probability of a split more uneven
    than this one, plus once that of this split (1 - half of it for an even split, 1.0 when nothing changed)."""
    m = fixed + broken
    if m == 0:
        return 1.0
    k = min(fixed, broken)
    point = Fraction(math.comb(m, k), 2 ** m)
    if fixed == broken:
        return float(1 - point / 2)
    tail = Fraction(sum(math.comb(m, i) for i in range(k + 1)), 2 ** m)
    return float(min(Fraction(1), 2 * tail) - point)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n``."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def newcombe_interval(both: int, fixed: int, broken: int, neither: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's (1998, method 10) interval for the paired change in accuracy, after minus before.

    Args: the four cells of the paired table: right both times, fixed (right only after), broken (right only
    before), wrong both times.
    """
    n = both + fixed + broken + neither
    p_after, p_before = (both + fixed) / n, (both + broken) / n
    l1, u1 = wilson_interval(both + fixed, n, z)
    l2, u2 = wilson_interval(both + broken, n, z)
    margins = (both + fixed) * (broken + neither) * (both + broken) * (fixed + neither)
    # the correlation of the two accuracies, with Newcombe's correction: a small positive one counts as none
    cross = both * neither - fixed * broken
    cross = cross - n / 2 if cross > n / 2 else min(cross, 0)
    phi = cross / math.sqrt(margins) if margins else 0.0
    change = p_after - p_before
    down = math.sqrt(max(0.0, (p_after - l1) ** 2 - 2 * phi * (p_after - l1) * (u2 - p_before) + (u2 - p_before) ** 2))
    up = math.sqrt(max(0.0, (u1 - p_after) ** 2 - 2 * phi * (u1 - p_after) * (p_before - l2) + (p_before - l2) ** 2))
    return change - down, change + up
