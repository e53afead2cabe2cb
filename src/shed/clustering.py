"""K-means over record embeddings and the proxy of each cluster: pure functions of arrays and seed.

Two implementations behind cluster.algorithm: scikit-learn (kmeans, minibatch; the default) and FAISS
(faiss: C = 3,000 on 1M x 384 in minutes on a CPU, on a GPU when faiss sees one). Both are seeded;
every array operation here is vectorised (no per-record Python loop) and works chunk by chunk on
memory-mapped embeddings, so no second copy of the pool's vectors is made.

`near_duplicates` is SemDeDup within each cluster (cluster.dedup_threshold; docs/method.md#near-duplicates):
members in the order of `members_by_distance`, each compared with the earlier members kept so far.
"""

from __future__ import annotations

import logging

import numpy as np

from shed.fileio import ShedError, install_hint

log = logging.getLogger(__name__)

ALGORITHMS = ("auto", "kmeans", "minibatch", "faiss")
CHUNK = 65_536  # rows per block when assigning or measuring distances
DEDUP_BLOCK = 2_048  # members per block in near_duplicates: two blocks' similarities are 2 x 16 MiB of float32


def kmeans(embeddings: np.ndarray, n_clusters: int, seed: int, algorithm: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(labels, centroids). auto: full k-means up to 50k records, mini-batch beyond; faiss: FAISS k-means.

    Labels are 0..K-1 with every cluster non-empty: a cluster left empty by the final assignment is
    dropped and the ones after it renumbered (`empty_clusters` counts them: K = n_clusters - that).
    """
    if algorithm == "faiss":
        labels, centroids = faiss_kmeans(embeddings, n_clusters, seed)
    else:
        from sklearn.cluster import KMeans, MiniBatchKMeans

        if algorithm == "auto":
            algorithm = "kmeans" if len(embeddings) <= 50_000 else "minibatch"
        if algorithm == "kmeans":
            model = KMeans(n_clusters=n_clusters, random_state=seed, n_init=3)
        elif algorithm == "minibatch":
            model = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=3, batch_size=4096)
        else:
            raise ShedError(f"cluster.algorithm: unknown value {algorithm!r} (choose one of {', '.join(ALGORITHMS)})")
        labels = model.fit_predict(embeddings).astype(np.int64)
        centroids = model.cluster_centers_.astype(np.float32)
    return drop_empty(labels, centroids)


def faiss_kmeans(embeddings: np.ndarray, n_clusters: int, seed: int, iterations: int = 20,
                 max_points_per_centroid: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """FAISS k-means (GPU when faiss has one), seeded; each record then goes to its nearest centroid.

    Training sees at most max_points_per_centroid x C records (a seeded subsample, as FAISS draws one).
    64, not FAISS's 256: training time grows with it, and at C = 3,000 on 1M records 256 x C is 768k
    records (about 25 minutes on 2 cores, estimated from the 100k run) against 192k; FAISS warns only
    below 39 per centroid.
    The centroids start from k-means++ on a seeded subsample of max(4 x C, 10,000) records (FAISS's
    own random start often merges two clusters); FAISS re-seeds empty clusters met during training
    by splitting a large one.
    """
    try:
        import faiss
    except ImportError:
        raise ShedError(f"cluster.algorithm faiss needs the faiss package: {install_hint('fast')} "
                        "(or faiss-gpu)") from None
    d = embeddings.shape[1]
    gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(d, n_clusters, niter=iterations, seed=seed, gpu=gpu, verbose=False,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    n_train = min(len(embeddings), max_points_per_centroid * n_clusters)
    if n_train < len(embeddings):
        # The same seeded subsample FAISS would draw, taken here so a memory-mapped pool is read only in part.
        rows = np.sort(np.random.default_rng(seed).choice(len(embeddings), n_train, replace=False))
        train = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
    else:
        train = np.ascontiguousarray(embeddings, dtype=np.float32)
    log.info("faiss k-means: %d clusters, trained on %d of %d records (%s)", n_clusters, len(train),
             len(embeddings), "GPU" if gpu else "CPU")
    rng = np.random.default_rng([seed, 1])
    seeding = train[np.sort(rng.choice(len(train), min(len(train), max(4 * n_clusters, 10_000)), replace=False))]
    start = kmeans_plus_plus(seeding, n_clusters, rng)
    del seeding
    km.train(train, init_centroids=start)
    del train
    centroids = km.centroids.astype(np.float32)
    labels = np.empty(len(embeddings), dtype=np.int64)
    for start in range(0, len(embeddings), CHUNK):
        block = np.ascontiguousarray(embeddings[start:start + CHUNK], dtype=np.float32)
        labels[start:start + len(block)] = km.index.search(block, 1)[1][:, 0]
    return labels, centroids


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (as scikit-learn's): at each step 2 + log(k) candidates are drawn with
    probability proportional to the squared distance to the nearest centre so far, and the one that
    lowers the total most is kept. O(k x trials x n x d), in matrix products."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    trials = 2 + int(np.log(k))
    norms = np.einsum("ij,ij->i", x, x)
    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    centres[0] = x[rng.integers(len(x))]
    closest = np.maximum(norms - 2 * (x @ centres[0]) + centres[0] @ centres[0], 0)
    for i in range(1, k):
        cumulative = np.cumsum(closest, dtype=np.float64)
        if cumulative[-1] <= 0:  # every record sits on a centre already
            centres[i] = x[rng.integers(len(x))]
            continue
        picks = np.minimum(np.searchsorted(cumulative, rng.random(trials) * cumulative[-1], side="right"), len(x) - 1)
        candidates = x[picks]
        distances = np.maximum(norms[:, None] - 2 * (x @ candidates.T) + norms[picks][None, :], 0)
        np.minimum(distances, closest[:, None], out=distances)
        best = int(np.argmin(distances.sum(0, dtype=np.float64)))
        centres[i], closest = candidates[best], distances[:, best].copy()
    return centres


def drop_empty(labels: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clusters without a member removed, the rest renumbered 0..K-1 in their order."""
    used = np.bincount(labels, minlength=len(centroids)) > 0
    if used.all():
        return labels, centroids
    log.info("%d of %d clusters are empty after the final assignment: dropped", int((~used).sum()), len(used))
    new_id = np.cumsum(used) - 1
    return new_id[labels].astype(np.int64), centroids[used]


def empty_clusters(n_clusters: int, labels: np.ndarray) -> int:
    """How many of the n_clusters asked for were dropped as empty."""
    return n_clusters - (int(labels.max()) + 1 if len(labels) else 0)


def distances_to_centroids(embeddings: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each record's Euclidean distance to its own centroid, block by block (no pool-sized temporary)."""
    out = np.empty(len(labels), dtype=np.float64 if embeddings.dtype == np.float64 else np.float32)
    for start in range(0, len(labels), CHUNK):
        stop = start + CHUNK
        out[start:stop] = np.linalg.norm(embeddings[start:stop] - centroids[labels[start:stop]], axis=1)
    return out


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


def near_duplicates(embeddings: np.ndarray, labels: np.ndarray, distances: np.ndarray, threshold: float,
                    block: int = DEDUP_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Semantic near-duplicates within each cluster: (duplicate rows, kept rows, cosine similarities), by
    duplicate row ascending.

    Each cluster's members are visited nearest the centroid first (ties: lowest row; `members_by_distance`,
    so a cluster's proxy is always kept). A member whose cosine similarity to a member kept before it exceeds
    `threshold` is a duplicate of the most similar such member (ties: the earliest kept); otherwise it is
    kept. Members are compared a block at a time with the cluster's kept members, a block of those at a time:
    memory is the cluster's vectors once and two block x block similarity matrices, never cluster size squared.
    threshold 0: none (off).
    """
    empty = np.empty(0, dtype=np.int64)
    if not threshold or not len(labels):
        return empty, empty, np.empty(0, dtype=np.float32)
    found = [_cluster_duplicates(embeddings, np.asarray(rows), threshold, block)
             for rows in members_by_distance(labels, distances).values()]
    duplicate, kept, similarity = (np.concatenate(parts) for parts in zip(*found))
    order = np.argsort(duplicate, kind="stable")
    return duplicate[order], kept[order], similarity[order]


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (embed writes them so already; a zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1)


def _cluster_duplicates(embeddings: np.ndarray, rows: np.ndarray, threshold: float,
                        block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`near_duplicates` for one cluster whose members, in visiting order, are `rows`."""
    kept_vectors = np.empty((len(rows), embeddings.shape[1]), dtype=np.float32)  # the kept members, in order
    kept_rows = np.empty(len(rows), dtype=np.int64)
    n_kept, duplicate, kept_of, similarity = 0, [], [], []
    for start in range(0, len(rows), block):
        members = rows[start:start + block]
        x = _unit_rows(embeddings[np.sort(members)])[np.argsort(np.argsort(members))]  # sorted reads, then reorder
        # Against the members kept in earlier blocks, a block of them at a time.
        best = np.full(len(x), -np.inf, dtype=np.float32)
        best_row = np.full(len(x), -1, dtype=np.int64)
        for k in range(0, n_kept, block):
            sims = x @ kept_vectors[k:min(k + block, n_kept)].T
            column = sims.argmax(1)
            top = sims[np.arange(len(x)), column]
            better = top > best
            best[better], best_row[better] = top[better], kept_rows[k + column[better]]
        is_duplicate = best > threshold
        # Within the block, in visiting order: only members with an earlier block member above the
        # threshold can change, and only once that earlier member's own fate is settled.
        in_block = np.tril(x @ x.T, -1)  # similarity of each member to the block's earlier members
        candidates = in_block > threshold
        for i in np.flatnonzero(candidates.any(1)):
            earlier = np.flatnonzero(candidates[i, :i] & ~is_duplicate[:i])
            if len(earlier):
                j = earlier[np.argmax(in_block[i, earlier])]
                if in_block[i, j] > best[i]:
                    best[i], best_row[i] = in_block[i, j], members[j]
                is_duplicate[i] = True
        keep = ~is_duplicate
        kept_vectors[n_kept:n_kept + keep.sum()] = x[keep]
        kept_rows[n_kept:n_kept + keep.sum()] = members[keep]
        n_kept += int(keep.sum())
        duplicate.append(members[is_duplicate])
        kept_of.append(best_row[is_duplicate])
        similarity.append(best[is_duplicate])
    return np.concatenate(duplicate), np.concatenate(kept_of), np.concatenate(similarity)
