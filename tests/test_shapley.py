"""The estimators on toy games with known Shapley values: no model involved."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shed.shapley import (
    ESTIMATORS,
    MemoUtility,
    all_subsets,
    antithetic,
    antithetic_permutation,
    exact_shapley,
    group_permutation,
    job_count,
    local_values,
    permutation,
    regression,
    schedule,
)


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


def random_game(players, seed):
    """A game with every kind of interaction: a random value per subset, plus a size trend."""
    rng = np.random.default_rng(seed)
    table = {s: float(rng.normal(scale=0.3) + math.sqrt(len(s)) + sum(0.2 * p for p in s)) for s in all_subsets(players)}
    return table.__getitem__


def spearman(a: dict, b: dict) -> float:
    keys = sorted(a)
    ra, rb = (np.argsort(np.argsort([d[k] for k in keys])) for d in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_exact_shapley_on_additive_and_glove_games():
    weights = {0: 1.0, 1: -2.0, 2: 0.5}
    assert exact_shapley(list(weights), additive(weights)) == pytest.approx(weights)
    # Glove game: player 0 holds a left glove, 1 and 2 right gloves; a pair is worth 1.
    glove = lambda s: float(0 in s and bool({1, 2} & s))  # noqa: E731
    assert exact_shapley([0, 1, 2], glove) == pytest.approx({0: 2 / 3, 1: 1 / 6, 2: 1 / 6})


@pytest.mark.parametrize("name", ["group_permutation", "antithetic", "regression"])
def test_marginal_and_regression_estimators_are_exact_on_additive_games(name):
    # Every marginal of an additive game is the player's weight, and least squares fits it
    # exactly; stratified reads means of v per size, exact only once the sizes are complete.
    weights = {p: float(p) - 2.5 for p in range(6)}
    result = ESTIMATORS[name](list(weights), additive(weights), k=4, n=1, seed=2)
    assert result.values == pytest.approx(weights)


@pytest.mark.parametrize("name", ["regression", "stratified"])
def test_subset_sampling_estimators_are_exact_once_every_subset_is_evaluated(name):
    players = list(range(7))
    game = random_game(players, seed=9)
    result = ESTIMATORS[name](players, game, k=200, n=1, seed=3)  # 6 subsets a iteration: all 128 by then
    assert len(result.evaluations) == 2 ** 7
    assert result.values == pytest.approx(exact_shapley(players, game), abs=1e-6)


def test_stratified_beats_the_paper_estimator_at_equal_cost_on_a_random_game():
    players = list(range(10))
    game = random_game(players, seed=5)
    exact = np.array(list(exact_shapley(players, game).values()))

    def error(name: str, seed: int) -> float:
        values = ESTIMATORS[name](players, game, k=12, n=1, seed=seed).values
        return float(np.mean((np.array([values[p] for p in players]) - exact) ** 2))

    paper = np.mean([error("group_permutation", s) for s in range(10)])
    assert np.mean([error("stratified", s) for s in range(10)]) < paper


def test_regression_splits_a_group_drop_between_its_members():
    # Crediting the whole drop gives both members of a removed pair their sum; least squares over
    # orders that separate them recovers each player's own weight.
    weights = {p: float(p) for p in range(8)}
    result = regression(list(weights), additive(weights), k=16, n=2, seed=0)
    assert result.values == pytest.approx(weights, abs=1e-6)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_approaches_exact_values_on_a_random_eleven_player_game(name):
    players = list(range(11))
    game = random_game(players, seed=4)
    exact = exact_shapley(players, game)
    result = ESTIMATORS[name](players, game, k=300, n=1, seed=1)
    assert spearman(result.values, exact) > 0.97
    assert max(abs(result.values[p] - exact[p]) for p in players) < 0.1


def test_antithetic_pairs_each_order_with_its_reverse():
    players = list(range(7))
    first, second = antithetic_permutation(players, 3, 4), antithetic_permutation(players, 3, 5)
    assert second == first[::-1] and first == permutation(players, 3, 2)


def test_antithetic_stderr_is_over_pairs():
    game = random_game(list(range(5)), seed=1)
    result = antithetic(list(range(5)), game, k=6, n=1, seed=0)
    credits = result.credits[0]
    pairs = [np.mean(credits[i:i + 2]) for i in (0, 2, 4)]
    assert result.stderr[0] == pytest.approx(np.std(pairs, ddof=1) / math.sqrt(3))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_schedule_lists_exactly_the_subsets_the_estimator_evaluates_in_order(name):
    players = list(range(9))
    result = ESTIMATORS[name](players, lambda s: float(sum(s)) ** 0.5, k=5, n=2, seed=3)
    assert schedule(name, players, 5, 2, 3) == list(result.evaluations)
    assert result.evaluations_made[-1] == len(result.evaluations)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_raising_k_reuses_every_earlier_evaluation(name):
    small = schedule(name, list(range(10)), 3, 2, 5)
    large = schedule(name, list(range(10)), 6, 2, 5)
    assert large[: len(small)] == small and len(large) > len(small)


game_sizes = st.integers(min_value=2, max_value=7)


@settings(max_examples=25, deadline=None)
@given(size=game_sizes, game_seed=st.integers(0, 10_000), seed=st.integers(0, 10_000), k=st.integers(1, 6),
       name=st.sampled_from(["group_permutation", "antithetic"]))
def test_single_removal_estimators_are_efficient(size, game_seed, seed, k, name):
    players = list(range(size))
    game = random_game(players, game_seed)
    result = ESTIMATORS[name](players, game, k=k, n=1, seed=seed)
    assert sum(result.values.values()) == pytest.approx(game(frozenset(players)) - game(frozenset()))


@settings(max_examples=25, deadline=None)
@given(size=game_sizes, game_seed=st.integers(0, 10_000), seed=st.integers(0, 10_000), k=st.integers(1, 6),
       n=st.integers(1, 3))
@pytest.mark.parametrize("name", ["regression", "stratified"])
def test_subset_sampling_estimators_are_efficient_for_any_group_size(name, size, game_seed, seed, k, n):
    players = list(range(size))
    game = random_game(players, game_seed)
    result = ESTIMATORS[name](players, game, k=k, n=min(n, size), seed=seed)
    assert sum(result.values.values()) == pytest.approx(game(frozenset(players)) - game(frozenset()), abs=1e-6)


@settings(max_examples=15, deadline=None)
@given(size=game_sizes, seed=st.integers(0, 10_000), name=st.sampled_from(sorted(ESTIMATORS)))
def test_every_estimator_is_deterministic(size, seed, name):
    players = list(range(size))
    game = random_game(players, 0)
    a = ESTIMATORS[name](players, game, k=3, n=2, seed=seed)
    b = ESTIMATORS[name](players, game, k=3, n=2, seed=seed)
    assert a.values == b.values and a.stderr.keys() == b.stderr.keys() and list(a.evaluations) == list(b.evaluations)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("size,k,n", [(5, 3, 2), (9, 30, 1)])  # (9, 30, 1): stratified's regression branch too
def test_a_vector_game_is_valued_component_by_component(name, size, k, n):
    """One pass over a per-question game equals one scalar run per question (the estimators are linear;
    near-singular fits of few observations agree to rounding)."""
    players = list(range(size))
    games = [random_game(players, seed) for seed in (1, 2, 3)]
    vector = ESTIMATORS[name](players, lambda s: np.array([g(s) for g in games]), k=k, n=n, seed=4)
    for i, game in enumerate(games):
        scalar = ESTIMATORS[name](players, game, k=k, n=n, seed=4)
        for p in players:
            assert vector.values[p][i] == pytest.approx(scalar.values[p], rel=1e-5, abs=1e-9)
            assert vector.stderr[p][i] == pytest.approx(scalar.stderr[p], rel=1e-5, abs=1e-9, nan_ok=True)
            assert [c[i] for c in vector.credits[p]] == pytest.approx(scalar.credits[p], rel=1e-5, abs=1e-9)
        assert [e[0][i] for e in vector.estimates] == pytest.approx([e[0] for e in scalar.estimates], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_local_values_equal_each_players_own_game(name):
    """Player p's local value over components {i, j} is its value in the game (g_i + g_j) / 2."""
    players = list(range(6))
    games = [random_game(players, seed) for seed in (5, 6, 7)]
    vector = ESTIMATORS[name](players, lambda s: np.array([g(s) for g in games]), k=4, n=1, seed=2)
    components = {p: np.array([p % 3, (p + 1) % 3]) for p in players}
    local = local_values(vector, components)
    for p in players:
        i, j = components[p]
        own = ESTIMATORS[name](players, lambda s: (games[i](s) + games[j](s)) / 2, k=4, n=1, seed=2)
        assert local.values[p] == pytest.approx(own.values[p], rel=1e-5, abs=1e-9)
        assert local.stderr[p] == pytest.approx(own.stderr[p], rel=1e-5, abs=1e-9)
        assert [e[p] for e in local.estimates] == pytest.approx([e[p] for e in own.estimates], rel=1e-5, abs=1e-9)
