"""K-means over record embeddings and the proxy of each cluster: pure functions of arrays and seed."""

from __future__ import annotations

import numpy as np


def kmeans(embeddings: np.ndarray, n_clusters: int, seed: int, algorithm: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(labels, centroids). Full k-means up to 50k records; mini-batch k-means beyond (1M-record pools)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if algorithm == "auto":
        algorithm = "kmeans" if len(embeddings) <= 50_000 else "minibatch"
    if algorithm == "kmeans":
        model = KMeans(n_clusters=n_clusters, random_state=seed, n_init=3)
    else:
        model = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=3, batch_size=4096)
    labels = model.fit_predict(embeddings)
    return labels.astype(np.int64), model.cluster_centers_.astype(np.float32)


def distances_to_centroids(embeddings: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.linalg.norm(embeddings - centroids[labels], axis=1)


def proxies(labels: np.ndarray, distances: np.ndarray) -> dict[int, int]:
    """For each non-empty cluster, the row index of its member nearest to the centroid (ties: lowest row)."""
    order = np.lexsort((np.arange(len(labels)), distances, labels))
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    return {int(labels[i]): int(i) for i in order[first]}


def members_by_distance(labels: np.ndarray, distances: np.ndarray) -> dict[int, list[int]]:
    """Row indices of each cluster's members, nearest to the centroid first (ties: lowest row)."""
    order = np.lexsort((np.arange(len(labels)), distances, labels))
    groups = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1) if len(order) else []
    return {int(labels[g[0]]): g.tolist() for g in groups}
