import numpy as np

from shed.clustering import distances_to_centroids, kmeans, members_by_distance, proxies


def test_proxy_is_the_member_nearest_its_centroid():
    vectors = np.array([[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [10.0, 10.0], [10.0, 10.4], [10.0, 10.1]], dtype=np.float32)
    labels, centroids = kmeans(vectors, 2, seed=0)
    dist = distances_to_centroids(vectors, labels, centroids)
    chosen = proxies(labels, dist)
    assert sorted(chosen.values()) == [1, 5]
    members = members_by_distance(labels, dist)
    assert members[labels[0]] == [1, 0, 2]
    assert members[labels[3]] == [5, 3, 4]


def test_kmeans_is_seeded():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 8)).astype(np.float32)
    a, _ = kmeans(vectors, 7, seed=3)
    b, _ = kmeans(vectors, 7, seed=3)
    assert (a == b).all() and len(set(a.tolist())) == 7


def test_ties_go_to_the_lowest_row():
    labels = np.array([0, 0, 1])
    dist = np.array([0.5, 0.5, 0.2])
    assert proxies(labels, dist) == {0: 0, 1: 2}
