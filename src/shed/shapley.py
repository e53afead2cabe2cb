"""Shapley estimators over a utility callable: pure, no I/O, no model.

SHED values the proxy set P = one record per cluster. A utility maps a subset of players to a
float (fine-tune on the subset, score on the dev set). The estimators here only decide which
subsets to evaluate and how to credit the differences; the caller decides what a utility is,
so toy games with known Shapley values test them exactly.

`group_permutation` is the paper's estimator: for each of k random orders of P, start from
v(P), remove the next n players, and credit every removed player with the whole drop
v(S_t) - v(S_{t+1}). A player's value is the mean of its k credits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

Player = Hashable
Utility = Callable[[frozenset], float]


@dataclass
class ShapleyResult:
    values: dict[Player, float]
    stderr: dict[Player, float]
    credits: dict[Player, list[float]]
    evaluations: dict[frozenset, float] = field(default_factory=dict)  # distinct subsets, in order made
    estimates: list[dict[Player, float]] = field(default_factory=list)  # running values after each iteration


class MemoUtility:
    """Evaluate each distinct subset once (v is deterministic, so repeats would only cost time)."""

    def __init__(self, utility: Utility):
        self.utility = utility
        self.cache: dict[frozenset, float] = {}

    def __call__(self, subset: frozenset) -> float:
        if subset not in self.cache:
            self.cache[subset] = float(self.utility(subset))
        return self.cache[subset]


def permutation(players: Sequence[Player], seed: int, iteration: int) -> list[Player]:
    """The iteration's order of players: a function of (seed, iteration) only, so raising k
    keeps every earlier iteration (and its evaluations) unchanged."""
    order = np.random.default_rng([seed, iteration]).permutation(len(players))
    return [players[i] for i in order]


def removal_schedule(order: Sequence[Player], n: int) -> list[list[Player]]:
    """Groups of n players removed in turn from the full set (the last group may be smaller)."""
    return [list(order[i:i + n]) for i in range(0, len(order), n)]


def group_permutation(players: Sequence[Player], utility: Utility, k: int, n: int, seed: int = 0) -> ShapleyResult:
    """The paper's backward group-permutation Monte Carlo estimate (see module docstring)."""
    if k < 1 or n < 1:
        raise ValueError("k and n must be at least 1")
    players = list(players)
    v = utility if isinstance(utility, MemoUtility) else MemoUtility(utility)
    credits: dict[Player, list[float]] = {p: [] for p in players}
    estimates = []
    for it in range(k):
        remaining = frozenset(players)
        value = v(remaining)
        for group in removal_schedule(permutation(players, seed, it), n):
            remaining = remaining - frozenset(group)
            smaller = v(remaining)
            for p in group:
                credits[p].append(value - smaller)
            value = smaller
        estimates.append({p: float(np.mean(c)) for p, c in credits.items()})
    values = {p: float(np.mean(c)) for p, c in credits.items()}
    stderr = {p: float(np.std(c, ddof=1) / math.sqrt(len(c))) if len(c) > 1 else float("nan")
              for p, c in credits.items()}
    return ShapleyResult(values, stderr, credits, dict(v.cache), estimates)


ESTIMATORS = {"group_permutation": group_permutation}


def job_count(n_players: int, k: int, n: int) -> int:
    """Distinct utility evaluations of group_permutation: v(P) and v(∅) once, ⌈C/n⌉-1 per iteration."""
    return 2 + k * (math.ceil(n_players / n) - 1)
