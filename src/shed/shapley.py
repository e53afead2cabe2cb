"""Shapley estimators over a utility callable: pure, no I/O, no model.

SHED values the proxy set P = one record per cluster. A utility maps a subset of players to a
float (fine-tune on the subset, score on the dev set). The estimators here only decide which
subsets to evaluate and how to turn their values into player values; the caller decides what a
utility is, so toy games with known Shapley values test them exactly.

Every estimator walks k orders of P backwards, as the paper does: from v(P), remove the next n
players, evaluate, repeat down to v(∅). They differ in the orders and in how values are read off:

- `group_permutation` (the paper): k independent random orders; every player of the group removed
  at step t is credited the whole drop v(S_t) - v(S_{t+1}); a value is the mean of k credits.
- `antithetic`: the same crediting, but order 2j+1 is order 2j reversed. A player removed early in
  one is removed late in the other, so their credits are negatively correlated and the mean
  converges faster; the standard error is taken over the pairs.
- `regression`: the antithetic subsets, read by weighted least squares: the additive game
  v(S) ≈ v(∅) + Σ_{i∈S} φ_i that is closest to the observed values under the Shapley kernel, with
  Σ φ_i = v(P) - v(∅) (KernelSHAP; over all subsets its solution is the Shapley value exactly).
  Every evaluation informs every player, and a group's drop is split between its members.

Each order depends only on (seed, iteration), so raising k keeps every earlier evaluation, and
`schedule` lists the subsets an estimator needs before any is evaluated (for parallel runs).
"""

from __future__ import annotations

import itertools
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
    credits: dict[Player, list[float]]  # per-iteration observations the stderr is computed from
    evaluations: dict[frozenset, float] = field(default_factory=dict)  # distinct subsets, in order made
    estimates: list[dict[Player, float]] = field(default_factory=list)  # running values after each iteration
    evaluations_made: list[int] = field(default_factory=list)  # distinct evaluations after each iteration


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


def antithetic_permutation(players: Sequence[Player], seed: int, iteration: int) -> list[Player]:
    """Iterations 2j and 2j+1 walk one random order forwards and backwards."""
    order = permutation(players, seed, iteration // 2)
    return order[::-1] if iteration % 2 else order


def removal_schedule(order: Sequence[Player], n: int) -> list[list[Player]]:
    """Groups of n players removed in turn from the full set (the last group may be smaller)."""
    return [list(order[i:i + n]) for i in range(0, len(order), n)]


def iteration_subsets(order: Sequence[Player], n: int) -> list[frozenset]:
    """P, then what remains after each removal, down to ∅."""
    remaining = frozenset(order)
    subsets = [remaining]
    for group in removal_schedule(order, n):
        remaining = remaining - frozenset(group)
        subsets.append(remaining)
    return subsets


def _check(k: int, n: int) -> None:
    if k < 1 or n < 1:
        raise ValueError("k and n must be at least 1")


def _mean(credits: dict[Player, list[float]]) -> dict[Player, float]:
    return {p: float(np.mean(c)) for p, c in credits.items()}


def _stderr(observations: dict[Player, list[float]]) -> dict[Player, float]:
    return {p: float(np.std(c, ddof=1) / math.sqrt(len(c))) if len(c) > 1 else float("nan")
            for p, c in observations.items()}


def _credit_walks(players, utility, k, n, order_of) -> tuple[dict, MemoUtility, list, list]:
    """Walk k orders backwards, crediting each removed group's members with the whole drop."""
    players = list(players)
    v = utility if isinstance(utility, MemoUtility) else MemoUtility(utility)
    credits: dict[Player, list[float]] = {p: [] for p in players}
    estimates, made = [], []
    for it in range(k):
        order = order_of(players, it)
        subsets = iteration_subsets(order, n)
        values = [v(s) for s in subsets]
        for group, before, after in zip(removal_schedule(order, n), values, values[1:]):
            for p in group:
                credits[p].append(before - after)
        estimates.append(_mean(credits))
        made.append(len(v.cache))
    return credits, v, estimates, made


def group_permutation(players: Sequence[Player], utility: Utility, k: int, n: int, seed: int = 0) -> ShapleyResult:
    """The paper's backward group-permutation Monte Carlo estimate (see module docstring)."""
    _check(k, n)
    credits, v, estimates, made = _credit_walks(players, utility, k, n, lambda ps, it: permutation(ps, seed, it))
    return ShapleyResult(_mean(credits), _stderr(credits), credits, dict(v.cache), estimates, made)


def antithetic(players: Sequence[Player], utility: Utility, k: int, n: int, seed: int = 0) -> ShapleyResult:
    """group_permutation over antithetic pairs of orders; stderr over pair means (an odd k's last
    order stands alone)."""
    _check(k, n)
    credits, v, estimates, made = _credit_walks(players, utility, k, n,
                                                lambda ps, it: antithetic_permutation(ps, seed, it))
    pair_means = {p: [float(np.mean(c[i:i + 2])) for i in range(0, len(c), 2)] for p, c in credits.items()}
    return ShapleyResult(_mean(credits), _stderr(pair_means), credits, dict(v.cache), estimates, made)


def _kernel_fit(design: np.ndarray, sizes: np.ndarray, gains: np.ndarray, v_gain_full: float) -> np.ndarray:
    """Efficiency-constrained weighted least squares of an additive game.

    design: one 0/1 row per observed subset of 0 < size < N players; gains: v(S) - v(∅).
    An observation of size s weighs (N-1) / (s (N-s)) / m_s, with m_s the observations of that
    size: each size gets its whole Shapley-kernel mass, shared by the subsets seen of that size.
    """
    size = design.shape[1]
    counts = np.bincount(sizes, minlength=size + 1)
    weight = (size - 1) / (sizes * (size - sizes)) / counts[sizes]
    gram = (design * weight[:, None]).T @ design
    rhs = design.T @ (weight * gains)
    # A tiny ridge makes players never yet separated (always removed together) share equally
    # instead of leaving the system singular.
    gram += np.eye(size) * 1e-9 * max(np.trace(gram) / size, 1e-12)
    kkt = np.zeros((size + 1, size + 1))
    kkt[:size, :size] = gram
    kkt[:size, size] = kkt[size, :size] = 1.0
    return np.linalg.solve(kkt, np.append(rhs, v_gain_full))[:size]


def regression(players: Sequence[Player], utility: Utility, k: int, n: int, seed: int = 0) -> ShapleyResult:
    """KernelSHAP-style least squares over the antithetic schedule; stderr by leave-one-iteration-out
    jackknife (credits hold the jackknife pseudo-values, whose mean is the bias-corrected value)."""
    _check(k, n)
    players = list(players)
    index = {p: i for i, p in enumerate(players)}
    v = utility if isinstance(utility, MemoUtility) else MemoUtility(utility)
    rows, iteration, values = [], [], []
    made = []
    for it in range(k):
        subsets = iteration_subsets(antithetic_permutation(players, seed, it), n)
        walk = [v(s) for s in subsets]  # in the schedule's order
        for subset, value in zip(subsets[1:-1], walk[1:-1]):  # v(P), v(∅) enter as constraints
            row = np.zeros(len(players))
            row[[index[p] for p in subset]] = 1.0
            rows.append(row)
            iteration.append(it)
            values.append(value)
        made.append(len(v.cache))
    v_full, v_empty = v(frozenset(players)), v(frozenset())
    gains = np.array(values) - v_empty
    design = np.array(rows).reshape(-1, len(players))
    iteration = np.array(iteration)
    sizes = design.sum(1).astype(int)
    estimates = []

    def fit(mask: np.ndarray) -> np.ndarray:
        return _kernel_fit(design[mask], sizes[mask], gains[mask], v_full - v_empty)

    for it in range(k):
        estimates.append(dict(zip(players, map(float, fit(iteration <= it)))))
    phi = np.array([estimates[-1][p] for p in players])
    if k > 1:
        pseudo = np.array([k * phi - (k - 1) * fit(iteration != i) for i in range(k)])
    else:
        pseudo = phi[None, :]
    credits = {p: [float(x) for x in pseudo[:, i]] for i, p in enumerate(players)}
    return ShapleyResult(dict(estimates[-1]), _stderr(credits), credits, dict(v.cache), estimates, made)


ESTIMATORS = {"group_permutation": group_permutation, "antithetic": antithetic, "regression": regression}
ORDERS = {"group_permutation": permutation, "antithetic": antithetic_permutation, "regression": antithetic_permutation}


def schedule(estimator: str, players: Sequence[Player], k: int, n: int, seed: int = 0) -> list[frozenset]:
    """Every distinct subset the estimator will evaluate, in the order it first asks for it.
    All estimators here fix their subsets before seeing any value, so they can run in parallel."""
    _check(k, n)
    order_of = ORDERS[estimator]
    seen: dict[frozenset, None] = {}
    for it in range(k):
        for subset in iteration_subsets(order_of(list(players), seed, it), n):
            seen.setdefault(subset, None)
    return list(seen)


def job_count(n_players: int, k: int, n: int) -> int:
    """Distinct utility evaluations of group_permutation: v(P) and v(∅) once, ⌈C/n⌉-1 per iteration
    (an upper bound: two orders may share a subset, which is evaluated once)."""
    return 2 + k * (math.ceil(n_players / n) - 1)


def all_subsets(players: Sequence[Player]) -> list[frozenset]:
    return [frozenset(c) for r in range(len(players) + 1) for c in itertools.combinations(players, r)]


def exact_shapley(players: Sequence[Player], utility: Utility) -> dict[Player, float]:
    """Shapley values by enumerating all 2^N subsets (N up to ~16): the reference for tests and benchmarks."""
    players = list(players)
    size = len(players)
    v = {s: float(utility(s)) for s in all_subsets(players)}
    weight = [math.factorial(s) * math.factorial(size - s - 1) / math.factorial(size) for s in range(size)]
    values = {}
    for p in players:
        values[p] = sum(weight[len(s)] * (v[s | {p}] - v[s]) for s in v if p not in s)
    return values
