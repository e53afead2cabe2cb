"""Samplers from clusters to a curated subset of size N: pure functions of their inputs and seed.

`members` maps each cluster to its record ids ordered by distance to the centroid (nearest
first); `scores` maps each cluster to its Shapley value.
"""

from __future__ import annotations

import numpy as np

from shed.fileio import ShedError


def resolve_size(size: float, pool_size: int) -> int:
    """A fraction (<= 1) of the pool or a record count (> 1), as a record count."""
    n = int(round(size * pool_size)) if size <= 1 else int(size)
    if n < 1:
        raise ShedError(f"sample.subset_size: {size} of a {pool_size}-record pool selects no record")
    if n > pool_size:
        raise ShedError(f"sample.subset_size: {n} records asked for, but the pool has only {pool_size}")
    return n


def qocs(scores: dict[int, float], members: dict[int, list[str]], size: int) -> list[str]:
    """Quality-ordered cluster sampling: whole clusters in descending score until `size` records.

    Ties go to the lower cluster id; the last cluster contributes its members nearest the
    centroid first. (The authors' script wrote inside the loop and lost the last cluster.)
    """
    taken: list[str] = []
    for cluster in sorted(scores, key=lambda c: (-scores[c], c)):
        taken.extend(members[cluster][: size - len(taken)])
        if len(taken) == size:
            break
    return taken


def qwcs_probabilities(scores: np.ndarray, temperature: float) -> np.ndarray:
    logits = scores / temperature
    w = np.exp(logits - logits.max())
    return w / w.sum()


def qwcs(scores: dict[int, float], members: dict[int, list[str]], size: int, temperature: float,
         seed: int) -> list[str]:
    """Quality-weighted cluster sampling: draw a cluster with p ∝ exp(score / T) among clusters
    with members left, take one of its members uniformly at random, until `size` records.

    Draws are made in vectorised runs: between two exhaustions the cluster distribution is
    fixed, so a run of i.i.d. draws is accepted up to the draw that empties a cluster.
    """
    rng = np.random.default_rng([seed, 2])
    clusters = sorted(scores)
    order = {c: [members[c][i] for i in rng.permutation(len(members[c]))] for c in clusters}
    remaining = np.array([len(members[c]) for c in clusters])
    used = np.zeros(len(clusters), dtype=int)
    score_arr = np.array([scores[c] for c in clusters], dtype=float)
    taken: list[str] = []
    while len(taken) < size:
        active = np.flatnonzero(used < remaining)
        p = qwcs_probabilities(score_arr[active], temperature)
        draws = active[rng.choice(len(active), size=size - len(taken), p=p)]
        # running count of each drawn cluster; stop at the first draw that empties one
        counts = np.zeros(len(clusters), dtype=int)
        accept = len(draws)
        for i, c in enumerate(draws):
            counts[c] += 1
            if used[c] + counts[c] == remaining[c]:
                accept = i + 1
                break
        for c in draws[:accept]:
            taken.append(order[clusters[c]][used[c]])
            used[c] += 1
    return taken


def random_sample(ids: list[str], size: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 3])
    return [ids[i] for i in rng.choice(len(ids), size=size, replace=False)]


def dsir_sample(ids: list[str], log_weights: np.ndarray, size: int, seed: int) -> list[str]:
    """Importance resampling without replacement (Gumbel top-k, as DSIR's `resample`), heaviest key first."""
    rng = np.random.default_rng([seed, 4])
    keys = np.asarray(log_weights, dtype=float) + rng.gumbel(size=len(ids))
    return [ids[i] for i in np.argsort(-keys, kind="stable")[:size]]
