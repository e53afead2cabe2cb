"""QOCS, QWCS and random sampling with exact expectations."""

import numpy as np
import pytest

from shed.fileio import ShedError
from shed.sampling import qocs, qwcs, qwcs_probabilities, random_sample, resolve_size

MEMBERS = {0: ["a0", "a1", "a2"], 1: ["b0", "b1"], 2: ["c0", "c1", "c2", "c3"], 3: ["d0"]}
SCORES = {0: 0.2, 1: 0.9, 2: -0.1, 3: 0.5}


def test_qocs_takes_whole_clusters_in_score_order_and_the_last_partially():
    assert qocs(SCORES, MEMBERS, 5) == ["b0", "b1", "d0", "a0", "a1"]


def test_qocs_includes_the_last_cluster_when_it_fits_exactly():
    # The authors' script lost the final cluster; here size 6 ends exactly after cluster 0.
    assert qocs(SCORES, MEMBERS, 6) == ["b0", "b1", "d0", "a0", "a1", "a2"]
    assert len(qocs(SCORES, MEMBERS, 10)) == 10


def test_qocs_breaks_ties_by_cluster_id():
    assert qocs({0: 1.0, 1: 1.0}, {0: ["x"], 1: ["y"]}, 1) == ["x"]


def test_qwcs_probabilities_are_a_softmax_with_temperature():
    p = qwcs_probabilities(np.array([0.0, np.log(3.0)]), temperature=1.0)
    assert p == pytest.approx([0.25, 0.75])
    sharp = qwcs_probabilities(np.array([0.0, 0.01]), temperature=1e-4)
    assert sharp[1] > 0.999


def test_qwcs_low_temperature_drains_clusters_in_score_order():
    taken = qwcs(SCORES, MEMBERS, 6, temperature=1e-6, seed=0)
    assert sorted(taken[:2]) == ["b0", "b1"]
    assert taken[2] == "d0"
    assert set(taken[3:]) == {"a0", "a1", "a2"}


def test_qwcs_takes_each_record_at_most_once_and_is_deterministic():
    a = qwcs(SCORES, MEMBERS, 10, temperature=1.0, seed=3)
    assert sorted(a) == sorted(sum(MEMBERS.values(), []))
    assert a == qwcs(SCORES, MEMBERS, 10, temperature=1.0, seed=3)
    assert a != qwcs(SCORES, MEMBERS, 10, temperature=1.0, seed=4)


def test_qwcs_first_draw_frequencies_follow_the_weights():
    members = {0: [f"x{i}" for i in range(50)], 1: [f"y{i}" for i in range(50)]}
    scores = {0: 0.0, 1: float(np.log(3.0))}
    firsts = [qwcs(scores, members, 1, temperature=1.0, seed=s)[0][0] for s in range(2000)]
    assert firsts.count("y") / 2000 == pytest.approx(0.75, abs=0.03)


def test_random_sample_is_seeded_and_without_replacement():
    ids = [str(i) for i in range(100)]
    a = random_sample(ids, 30, seed=1)
    assert len(set(a)) == 30 and a == random_sample(ids, 30, seed=1) and a != random_sample(ids, 30, seed=2)


@pytest.mark.parametrize("size,expected", [(0.1, 10), (1.0, 100), (25, 25), (100, 100)])
def test_resolve_size(size, expected):
    assert resolve_size(size, 100) == expected


@pytest.mark.parametrize("size", [101, 0.001])
def test_resolve_size_rejects_impossible_sizes(size):
    with pytest.raises(ShedError, match="sample.subset_size"):
        resolve_size(size, 100)
