"""The estimator on toy games with known Shapley values: no model involved."""

import itertools
import math

import pytest

from shed.shapley import MemoUtility, group_permutation, job_count, permutation


def additive(weights):
    return lambda s: sum(weights[p] for p in s)


def test_additive_game_single_removals_are_exact():
    weights = {0: 1.0, 1: -2.0, 2: 0.5, 3: 3.0, 4: 0.0}
    result = group_permutation(list(weights), additive(weights), k=3, n=1, seed=7)
    assert result.values == pytest.approx(weights)
    assert all(len(c) == 3 for c in result.credits.values())


def test_group_removal_credits_whole_drop_to_each_member():
    weights = {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0}
    result = group_permutation(list(weights), additive(weights), k=1, n=2, seed=0)
    order = permutation(list(weights), 0, 0)
    first, second = order[:2], order[2:]
    for p in first:
        assert result.credits[p] == [pytest.approx(sum(weights[q] for q in first))]
    for p in second:
        assert result.credits[p] == [pytest.approx(sum(weights[q] for q in second))]


def test_symmetric_game_single_removals_are_efficient_and_average_to_equal_shares():
    # v(S) = f(|S|): players are interchangeable, so the exact values are equal, (f(6) - f(0)) / 6.
    # With n=1 each iteration's credits sum to v(P) - v(∅) exactly (efficiency), and the
    # estimate approaches the equal share as k grows.
    f = lambda s: math.sqrt(len(s))  # noqa: E731
    result = group_permutation(list(range(6)), f, k=3000, n=1, seed=3)
    assert sum(result.values.values()) == pytest.approx(f(range(6)) - f([]))
    for value in result.values.values():
        assert value == pytest.approx(math.sqrt(6) / 6, abs=0.02)


def test_single_removal_matches_exact_shapley_on_small_game():
    # Exact Shapley by enumeration of all orders of 4 players; group_permutation with n=1 and
    # all 24 orders as iterations is the permutation estimator: compare its mean over many k.
    players = [0, 1, 2, 3]
    v = lambda s: (len(s) ** 2) + (3 if {0, 1} <= set(s) else 0) - (2 if 2 in s else 0)  # noqa: E731
    exact = {p: 0.0 for p in players}
    orders = list(itertools.permutations(players))
    for order in orders:
        for i, p in enumerate(order):
            exact[p] += (v(order[: i + 1]) - v(order[:i])) / len(orders)
    result = group_permutation(players, lambda s: v(tuple(s)), k=4000, n=1, seed=1)
    for p in players:
        assert result.values[p] == pytest.approx(exact[p], abs=0.15)


def test_each_distinct_subset_is_evaluated_once_and_job_count_is_exact():
    calls = []

    def utility(s):
        calls.append(s)
        return float(len(s))

    result = group_permutation(list(range(10)), utility, k=4, n=3, seed=0)
    assert len(calls) == len(set(calls)) == len(result.evaluations) == job_count(10, 4, 3)
    assert frozenset() in result.evaluations and frozenset(range(10)) in result.evaluations


def test_raising_k_keeps_earlier_iterations():
    memo = MemoUtility(lambda s: float(sum(s)))
    small = group_permutation(list(range(8)), memo, k=2, n=2, seed=5)
    calls_before = len(memo.cache)
    large = group_permutation(list(range(8)), memo, k=4, n=2, seed=5)
    assert all(large.credits[p][:2] == small.credits[p] for p in range(8))
    assert len(memo.cache) > calls_before
    assert set(small.evaluations) <= set(large.evaluations)


def test_deterministic_for_a_seed_and_different_across_seeds():
    weights = {p: float(p) for p in range(12)}
    u = lambda s: sum(weights[p] for p in s) ** 1.5  # noqa: E731
    a = group_permutation(list(weights), u, k=3, n=4, seed=11)
    b = group_permutation(list(weights), u, k=3, n=4, seed=11)
    c = group_permutation(list(weights), u, k=3, n=4, seed=12)
    assert a.values == b.values
    assert a.values != c.values


def test_stderr_is_nan_for_a_single_iteration_and_finite_after():
    one = group_permutation([0, 1, 2], lambda s: float(len(s)), k=1, n=1, seed=0)
    assert all(math.isnan(e) for e in one.stderr.values())
    two = group_permutation([0, 1, 2], lambda s: float(len(s)) ** 2, k=3, n=1, seed=0)
    assert all(math.isfinite(e) for e in two.stderr.values())


def test_rejects_bad_k_and_n():
    with pytest.raises(ValueError):
        group_permutation([0, 1], lambda s: 0.0, k=0, n=1)
    with pytest.raises(ValueError):
        group_permutation([0, 1], lambda s: 0.0, k=1, n=0)
