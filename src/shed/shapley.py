"""Shapley estimators over a utility callable: pure, no I/O, no model.

SHED values the proxy set P = one record per cluster. A utility maps a subset of players to a
float (fine-tune on the subset, score on the dev set), or to a vector of floats, one per dev
question: every estimator here is linear in the values, so a vector game is valued component by
component (as if each question were its own game) in one pass. The estimators here only decide which
subsets to evaluate and how to turn their values into player values; the caller decides what a
utility is, so toy games with known Shapley values test them exactly.

Each iteration costs ⌈C/n⌉ - 1 new evaluations (the paper's cost per order), plus v(P) and v(∅).
The estimators differ in which subsets they evaluate and how they read values off them:

- `group_permutation` (the paper): k independent random orders, each walked backwards from v(P),
  removing n players per step; every player of the group removed at step t is credited the
  whole drop v(S_t) - v(S_{t+1}); a value is the mean of k credits.
- `antithetic`: the same crediting, but order 2j+1 is order 2j reversed. A player removed early in
  one is removed late in the other, so their credits are negatively correlated and the mean
  converges faster; the standard error is taken over the pairs.
- `regression` (KernelSHAP): complementary subset pairs drawn by Shapley-kernel size, read by
  weighted least squares: the additive game v(S) ≈ v(∅) + Σ_{i∈S} φ_i closest to the observed
  values under the kernel, with Σ φ_i = v(P) - v(∅). Over all subsets it is exact.
- `stratified` (stratified SVARM with a per-size regression correction): subsets drawn size by
  size; φ_i = (v(P) - v(∅))/N + the mean over sizes t of [mean v of observed size-t subsets with
  i - mean v of those without i]. Every evaluation informs every player; exact over all subsets.
  On the real 12-proxy game of benchmarks/shapley_engine.py it needs the fewest evaluations.

Every subset depends only on (seed, iteration), so raising k keeps every earlier evaluation, and
`schedule` lists the subsets an estimator needs before any is evaluated (for parallel runs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

Player = Hashable
Value = float | np.ndarray  # a scalar game, or one game per component (e.g. per dev question)
Utility = Callable[[frozenset], Value]


def _value(x) -> Value:
    """A float for a scalar, a float array for a vector (so results print and compare plainly)."""
    return float(x) if np.ndim(x) == 0 else np.asarray(x, dtype=float)


def _column(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    """x (one entry per row of `like`) shaped to broadcast over `like`'s components."""
    return x.reshape(-1, *[1] * (like.ndim - 1))


@dataclass
class ShapleyResult:
    values: dict[Player, Value]
    stderr: dict[Player, Value]
    credits: dict[Player, list[Value]]  # per-iteration observations the stderr is computed from
    evaluations: dict[frozenset, Value] = field(default_factory=dict)  # distinct subsets, in order made
    estimates: list[dict[Player, Value]] = field(default_factory=list)  # running values after each iteration
    evaluations_made: list[int] = field(default_factory=list)  # distinct evaluations after each iteration
    stderr_group: int = 1  # credits are averaged in runs of this many before the stderr (antithetic pairs: 2)


class MemoUtility:
    """Evaluate each distinct subset once (v is deterministic, so repeats would only cost time)."""

    def __init__(self, utility: Utility):
        self.utility = utility
        self.cache: dict[frozenset, Value] = {}

    def __call__(self, subset: frozenset) -> Value:
        if subset not in self.cache:
            self.cache[subset] = _value(self.utility(subset))
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


def _mean(credits: dict[Player, list[Value]]) -> dict[Player, Value]:
    return {p: _value(np.mean(c, axis=0)) for p, c in credits.items()}


def _stderr_of(observations: list[Value]) -> Value:
    """Standard error of the mean of per-iteration observations (NaN from fewer than two)."""
    if len(observations) < 2:
        return _value(np.full(np.shape(observations[0]) if observations else (), np.nan))
    return _value(np.std(observations, axis=0, ddof=1) / math.sqrt(len(observations)))


def _stderr(observations: dict[Player, list[Value]], group: int = 1) -> dict[Player, Value]:
    """Per player, over its observations averaged in runs of `group` (the last run may be shorter)."""
    return {p: _stderr_of([_value(np.mean(c[i:i + group], axis=0)) for i in range(0, len(c), group)])
            for p, c in observations.items()}


def _credit_walks(players, utility, k, n, order_of) -> tuple[dict, MemoUtility, list, list]:
    """Walk k orders backwards, crediting each removed group's members with the whole drop."""
    players = list(players)
    v = utility if isinstance(utility, MemoUtility) else MemoUtility(utility)
    credits: dict[Player, list[Value]] = {p: [] for p in players}
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
    return ShapleyResult(_mean(credits), _stderr(credits, group=2), credits, dict(v.cache), estimates, made, 2)


def _kernel_fit(design: np.ndarray, sizes: np.ndarray, gains: np.ndarray, v_gain_full: Value) -> np.ndarray:
    """Efficiency-constrained weighted least squares of an additive game.

    design: one 0/1 row per observed subset of 0 < size < N players; gains: v(S) - v(∅), one row
    per subset (a vector game: one column per component, all solved with one factorisation).
    An observation of size s weighs (N-1) / (s (N-s)) / m_s, with m_s the observations of that
    size: each size gets its whole Shapley-kernel mass, shared by the subsets seen of that size.
    """
    size = design.shape[1]
    counts = np.bincount(sizes, minlength=size + 1)
    weight = (size - 1) / (sizes * (size - sizes)) / counts[sizes]
    gram = (design * weight[:, None]).T @ design
    rhs = (design * weight[:, None]).T @ gains
    # A tiny ridge makes players never yet separated (always removed together) share equally
    # instead of leaving the system singular.
    gram += np.eye(size) * 1e-9 * max(np.trace(gram) / size, 1e-12)
    kkt = np.zeros((size + 1, size + 1))
    kkt[:size, :size] = gram
    kkt[:size, size] = kkt[size, :size] = 1.0
    return np.linalg.solve(kkt, np.concatenate([rhs, np.asarray(v_gain_full, dtype=float)[None]]))[:size]


def _pair_classes(size: int) -> dict[int, tuple[float, int]]:
    """Paired size classes s = 1..N//2 (a subset of s players and its complement of N-s): the
    Shapley-kernel mass of the class and how many pairs it holds."""
    classes = {}
    for s in range(1, size // 2 + 1):
        mass = (size - 1) / (s * (size - s))
        if s == size - s:
            classes[s] = (mass, math.comb(size, s) // 2)
        else:
            classes[s] = (2 * mass, math.comb(size, s))
    return classes


_ENUMERATE_UP_TO = 4096  # classes with at most this many subsets are shuffled whole, larger ones sampled


def _apportioned(mass: dict[int, float], total: dict[int, int], deck: Callable[[int], list[frozenset]],
                 sample: Callable[[int, np.random.Generator], frozenset], seed: int) -> Iterator[frozenset]:
    """Subsets of size classes, until every class is drawn whole. Draw j goes to the open class
    furthest behind its share of `mass` (Webster apportionment), as a subset of that class not
    drawn before: from the class's whole `deck`, shuffled once, when it holds at most
    _ENUMERATE_UP_TO subsets; else `sample`d with rejection of repeats. Each draw depends on
    (seed, class, draw number) only, so a longer stream starts with the shorter one."""
    drawn: dict[int, set[frozenset]] = {c: set() for c in mass}
    decks: dict[int, list[frozenset]] = {}
    while open_classes := [c for c in mass if len(drawn[c]) < total[c]]:
        c = max(open_classes, key=lambda c: (mass[c] / (2 * len(drawn[c]) + 1), -c))
        count = len(drawn[c])
        if total[c] <= _ENUMERATE_UP_TO:
            if c not in decks:
                whole = deck(c)
                decks[c] = [whole[i] for i in np.random.default_rng([seed, c]).permutation(len(whole))]
            subset = decks[c][count]
        else:
            rng = np.random.default_rng([seed, c, count])
            while (subset := sample(c, rng)) in drawn[c]:
                pass
        drawn[c].add(subset)
        yield subset


def kernel_pairs(players: Sequence[Player], seed: int) -> Iterator[tuple[frozenset, frozenset]]:
    """An endless (until every subset is drawn) stream of complementary pairs (S, P - S), drawn by
    `_apportioned` over the paired size classes s = 1..N//2 (each pair named by its member
    holding players[0] when s = N - s). Classes with few pairs, the extremes (one player in or
    one out) first, are soon drawn whole and then enter the fit exactly; large classes are sampled.
    """
    players = list(players)
    size = len(players)
    full = frozenset(players)
    classes = _pair_classes(size)

    def deck(s: int) -> list[frozenset]:
        rest = players[1:]
        pairs = [frozenset((players[0], *c)) for c in itertools.combinations(rest, s - 1)]
        if s != size - s:
            pairs += [frozenset(c) for c in itertools.combinations(rest, s)]
        return pairs

    def sample(s: int, rng: np.random.Generator) -> frozenset:
        subset = frozenset(players[i] for i in rng.choice(size, size=s, replace=False))
        return subset if players[0] in subset or s != size - s else full - subset

    for subset in _apportioned({s: m for s, (m, _) in classes.items()}, {s: t for s, (_, t) in classes.items()},
                               deck, sample, seed):
        yield subset, full - subset


def kernel_subsets(players: Sequence[Player], k: int, n: int, seed: int) -> list[list[frozenset]]:
    """The subsets `regression` evaluates per iteration: pair members of `kernel_pairs` in turn."""
    return _per_iteration(players, k, n, (s for pair in kernel_pairs(players, seed) for s in pair))


def _jackknifed(players: list, fit: Callable[[np.ndarray], np.ndarray], estimates: list[dict], v: MemoUtility,
                made: list[int]) -> ShapleyResult:
    """The result of an estimator that refits from any subset of its k iterations: stderr by
    leave-one-iteration-out jackknife; credits hold the pseudo-values (their mean is bias-corrected)."""
    k = len(estimates)
    phi = np.array([estimates[-1][p] for p in players])  # (N,) or (N, components)
    if k > 1:
        pseudo = np.array([k * phi - (k - 1) * fit(np.arange(k) != out) for out in range(k)])
    else:
        pseudo = phi[None, :]
    credits = {p: [_value(x) for x in pseudo[:, i]] for i, p in enumerate(players)}
    return ShapleyResult(dict(estimates[-1]), _stderr(credits), credits, dict(v.cache), estimates, made)


def regression(players: Sequence[Player], utility: Utility, k: int, n: int, seed: int = 0) -> ShapleyResult:
    """KernelSHAP: complementary subset pairs drawn by Shapley-kernel size (`kernel_pairs`), read by
    efficiency-constrained weighted least squares (`_kernel_fit`). The cost per iteration equals
    group_permutation's; n only sets that cost. stderr by leave-one-iteration-out jackknife
    (credits hold the jackknife pseudo-values)."""
    _check(k, n)
    players = list(players)
    index = {p: i for i, p in enumerate(players)}
    v = utility if isinstance(utility, MemoUtility) else MemoUtility(utility)
    full, empty = frozenset(players), frozenset()
    rows, iteration, values = [], [], []
    made = []
    for it, subsets in enumerate(kernel_subsets(players, k, n, seed)):
        for subset in subsets:
            value = v(subset)
            if subset in (full, empty):  # v(P), v(∅) enter as constraints
                continue
            row = np.zeros(len(players))
            row[[index[p] for p in subset]] = 1.0
            rows.append(row)
            iteration.append(it)
            values.append(value)
        made.append(len(v.cache))
    v_full, v_empty = v(full), v(empty)
    gains = np.array(values) - v_empty
    design = np.array(rows).reshape(-1, len(players))
    iteration = np.array(iteration, dtype=int)
    sizes = design.sum(1).astype(int)
    estimates = []

    def fit(keep: np.ndarray) -> np.ndarray:  # keep: which iterations' observations to use
        rows = keep[iteration]
        return _kernel_fit(design[rows], sizes[rows], gains[rows], v_full - v_empty)

    for it in range(k):
        estimates.append(dict(zip(players, map(_value, fit(np.arange(k) <= it)))))
    return _jackknifed(players, fit, estimates, v, made)


def size_strata_subsets(players: Sequence[Player], seed: int) -> Iterator[frozenset]:
    """An endless (until every proper non-empty subset is drawn) stream of subsets for `stratified`,
    drawn by `_apportioned` over the sizes t = 1..N-1 with the Shapley-kernel mass 1/(t(N-t)).
    Small sizes and their mirrors (one player in, one out) are soon drawn whole and then enter
    exactly; large sizes are sampled."""
    players = list(players)
    size = len(players)
    mass = {t: 1.0 / (t * (size - t)) for t in range(1, size)}

    def deck(t: int) -> list[frozenset]:
        return [frozenset(players[i] for i in c) for c in itertools.combinations(range(size), t)]

    def sample(t: int, rng: np.random.Generator) -> frozenset:
        return frozenset(players[i] for i in rng.choice(size, size=t, replace=False))

    yield from _apportioned(mass, {t: math.comb(size, t) for t in mass}, deck, sample, seed)


def _per_iteration(players: Sequence[Player], k: int, n: int, stream: Iterator[frozenset]) -> list[list[frozenset]]:
    """P and ∅ first, then ⌈C/n⌉ - 1 subsets of `stream` per iteration (group_permutation's cost per order)."""
    per_iteration = max(1, math.ceil(len(players) / n) - 1)
    out = [list(itertools.islice(stream, per_iteration)) for _ in range(k)]
    out[0] = [frozenset(players), frozenset(), *out[0]]
    return out


STRATUM_RIDGE = 10.0  # a prior worth ~10 observations holding a size's regression slopes at 0


def _size_difference(design: np.ndarray, values: np.ndarray, complete: bool) -> np.ndarray:
    """D_t[i] = mean v(T) over observed size-t subsets holding i - mean over those without i.

    With at least 2N observations of an incomplete size, read by the survey-sampling regression
    (GREG) estimator: a ridge fit v ≈ a + x·b within the size corrects for how unevenly the other
    players fell in the "with i" and "without i" samples; D = difference of residual means + the
    fit's own exact difference (N b_i - Σb)/(N-1). On a complete size it is the plain difference.
    """
    m, size = design.shape
    inside = design.sum(0)  # values: (m,) or (m, components)
    outside = m - inside
    seen = (inside > 0) & (outside > 0)  # a player never seen both ways contributes 0 for this size
    residual, adjust = values, np.zeros((size, *values.shape[1:]))
    if m >= 2 * size and not complete:
        t = design[0].sum()
        centred = design - inside / m
        slopes = np.linalg.solve(centred.T @ centred + STRATUM_RIDGE * (t / size) * (1 - t / size) * np.eye(size),
                                 centred.T @ (values - values.mean(0)))
        residual = values - design @ slopes
        adjust = (size * slopes - slopes.sum(0)) / (size - 1)
    sum_in = design.T @ residual
    sum_out = residual.sum(0) - sum_in
    out = np.zeros(sum_in.shape)
    out[seen] = (sum_in[seen] / _column(inside[seen], sum_in) - sum_out[seen] / _column(outside[seen], sum_in)
                 + adjust[seen])
    return out


def stratified(players: Sequence[Player], utility: Utility, k: int, n: int, seed: int = 0) -> ShapleyResult:
    """Stratified SVARM (Kolpaczki et al., AAAI 2024) read with a per-size regression correction.

    φ_i = (v(P) - v(∅))/N + (1/N) Σ_t D_t[i] over sizes t = 1..N-1 (`_size_difference`): every
    evaluation informs every player, not just the two whose marginal it completes. Subsets come
    from `size_strata_subsets`, ⌈C/n⌉ - 1 per iteration. Exact once every subset is evaluated.
    stderr by leave-one-iteration-out jackknife (credits hold the pseudo-values).
    """
    _check(k, n)
    players = list(players)
    size = len(players)
    index = {p: i for i, p in enumerate(players)}
    v = utility if isinstance(utility, MemoUtility) else MemoUtility(utility)
    full, empty = frozenset(players), frozenset()
    rows: list[tuple[int, int, np.ndarray, float]] = []  # (iteration, size, 0/1 row, value)
    made = []
    for it, subsets in enumerate(_per_iteration(players, k, n, size_strata_subsets(players, seed))):
        for subset in subsets:
            value = v(subset)
            if subset not in (full, empty):
                row = np.zeros(size)
                row[[index[p] for p in subset]] = 1.0
                rows.append((it, len(subset), row, value))
        made.append(len(v.cache))
    gain = v(full) - v(empty)
    by_size = {t: (np.array([it for it, s, _, _ in rows if s == t]), np.array([r for _, s, r, _ in rows if s == t]),
                   np.array([y for _, s, _, y in rows if s == t])) for t in sorted({s for _, s, _, _ in rows})}

    def difference(t: int, keep: np.ndarray) -> np.ndarray:
        """D_t from the size-t observations of the iterations where keep[iteration] holds."""
        iters, design, ys = by_size[t]
        mask = keep[iters]
        if not mask.any():
            return np.zeros((size, *np.shape(gain)))
        return _size_difference(design[mask], ys[mask], int(mask.sum()) == math.comb(size, t))

    def values(differences: dict[int, np.ndarray]) -> np.ndarray:
        phi = (gain + sum(differences.values(), np.zeros((size, *np.shape(gain))))) / size
        return phi + (gain - phi.sum(0)) / size  # efficiency by a common shift: ranks unchanged

    differences: dict[int, np.ndarray] = {}
    estimates = []
    iteration = np.arange(k)
    for last in range(k):  # running values: refit only the sizes this iteration added to
        for t in {s for it, s, _, _ in rows if it == last}:
            differences[t] = difference(t, iteration <= last)
        estimates.append(dict(zip(players, map(_value, values(differences)))))

    def fit(keep: np.ndarray) -> np.ndarray:
        return values({t: difference(t, keep) for t in differences})

    return _jackknifed(players, fit, estimates, v, made)


def local_values(result: ShapleyResult, components: dict[Player, np.ndarray]) -> ShapleyResult:
    """Each player's value in its own game, the mean of a vector game's components over
    `components[p]` (e.g. the dev questions nearest the player), from one vector-game result:
    the estimators are linear, so this equals running each player's game on its own. Scalar
    values, stderr, credits and running estimates; evaluations keep the vectors."""
    def mean(p: Player, x: np.ndarray) -> float:
        return float(np.mean(np.asarray(x)[components[p]]))

    credits = {p: [mean(p, c) for c in cs] for p, cs in result.credits.items()}
    return ShapleyResult({p: mean(p, v) for p, v in result.values.items()}, _stderr(credits, result.stderr_group),
                         credits, result.evaluations, [{p: mean(p, v) for p, v in e.items()} for e in result.estimates],
                         result.evaluations_made, result.stderr_group)


ESTIMATORS = {"group_permutation": group_permutation, "antithetic": antithetic, "regression": regression,
              "stratified": stratified}
ORDERS = {"group_permutation": permutation, "antithetic": antithetic_permutation}


def _iterations(estimator: str, players: Sequence[Player], k: int, n: int, seed: int) -> list[list[frozenset]]:
    if estimator == "regression":
        return kernel_subsets(players, k, n, seed)
    if estimator == "stratified":
        return _per_iteration(players, k, n, size_strata_subsets(players, seed))
    return [iteration_subsets(ORDERS[estimator](list(players), seed, it), n) for it in range(k)]


def schedule(estimator: str, players: Sequence[Player], k: int, n: int, seed: int = 0) -> list[frozenset]:
    """Every distinct subset the estimator will evaluate, in the order it first asks for it.
    All estimators here fix their subsets before seeing any value, so they can run in parallel."""
    _check(k, n)
    seen: dict[frozenset, None] = {}
    for subsets in _iterations(estimator, players, k, n, seed):
        for subset in subsets:
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
