"""Samplers from clusters to a curated subset of size N: pure functions of their inputs and seed.

`members` maps each cluster to its record ids ordered by distance to the centroid (nearest
first); `scores` maps each cluster to its Shapley value. The baselines `longest_output` and
`lowest_loss` rank records by a per-record number computed elsewhere (no model here).
"""

from __future__ import annotations

import math

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


def qfcs(scores: dict[int, float], members: dict[int, list[str]], size: int, exclude: float,
         seed: int, key_of: dict[str, float] | None = None) -> list[str]:
    """Quality-filtered cluster sampling: leave out the lowest-scored clusters, whole, while they hold at most
    `exclude` of the records (fewer where the rest could not give `size`), then draw `size` of the remaining
    records uniformly at random. The value decides what is dropped, not what is kept, so the subset covers every
    kept cluster as a random sample does (QOCS and QWCS gather it into the top clusters).

    `key_of` (a record signal's sort keys, ascending = preferred, as `order_within` reads them) also leaves out the
    worst `exclude` of the kept records by it (a NaN key worst), again never so many that fewer than `size` remain.

    Ties in score drop the higher cluster id first; the draw is `random_sample`'s over the kept records in
    cluster order, members nearest the centroid first."""
    total = sum(len(m) for m in members.values())
    budget = min(int(math.floor(exclude * total)), total - size)
    dropped: set[int] = set()
    left_out = 0
    for cluster in sorted(scores, key=lambda c: (scores[c], -c)):
        if left_out + len(members[cluster]) > budget:
            break
        dropped.add(cluster)
        left_out += len(members[cluster])
    kept = [i for c in sorted(members) if c not in dropped for i in members[c]]
    if key_of is not None:
        cut = min(int(math.floor(exclude * len(kept))), len(kept) - size)
        if cut > 0:
            def badness(i: int) -> tuple:
                k = key_of[kept[i]]
                return (not math.isnan(k), 0.0 if math.isnan(k) else -k, i)
            worst = set(sorted(range(len(kept)), key=badness)[:cut])
            kept = [rid for i, rid in enumerate(kept) if i not in worst]
    return random_sample(kept, size, seed)


def qwcs_probabilities(scores: np.ndarray, temperature: float) -> np.ndarray:
    logits = scores / temperature
    w = np.exp(logits - logits.max())
    return w / w.sum()


def qwcs(scores: dict[int, float], members: dict[int, list[str]], size: int, temperature: float,
         seed: int, ordered: bool = False) -> list[str]:
    """Quality-weighted cluster sampling: draw a cluster with p ∝ exp(score / T) among clusters
    with members left, take one of its members uniformly at random (`ordered`: the next of its
    members in the given order instead), until `size` records.

    Draws are made in vectorised runs: between two exhaustions the cluster distribution is
    fixed, so a run of i.i.d. draws is accepted up to the draw that empties a cluster.
    """
    rng = np.random.default_rng([seed, 2])
    clusters = sorted(scores)
    order = {c: list(members[c]) if ordered else [members[c][i] for i in rng.permutation(len(members[c]))]
             for c in clusters}
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


def order_within(members: dict[int, list[str]], key_of: dict[str, float]) -> dict[int, list[str]]:
    """Each cluster's members by `key_of` ascending (a NaN key last), ties in their given order
    (nearest the centroid first): the record-level signal that picks which members a cluster gives."""
    def key(pair: tuple[int, str]) -> tuple:
        k = key_of[pair[1]]
        return (math.isnan(k), 0.0 if math.isnan(k) else k, pair[0])
    return {c: [rid for _, rid in sorted(enumerate(ids), key=key)] for c, ids in members.items()}


def ifd_keys(values: list[float]) -> list[float]:
    """Sort keys (ascending = preferred) for IFD, as Superfiltering ranks it: records whose response the
    instruction helps predict (IFD < 1) by IFD descending, then the rest (IFD >= 1 or NaN)."""
    return [-v if v < 1 else float("nan") for v in values]


def relevance(conditional: list[float], unconditional: list[float]) -> list[float]:
    """How much the instruction tells about the response, per record: the response's mean per-token loss alone
    minus given its instruction (their pointwise mutual information per token, in nats); near 0 or below when
    the response would read the same after any instruction (a reply to another question, a stock phrase). NaN
    where either loss is not finite."""
    return [u - c if math.isfinite(c) and math.isfinite(u) else float("nan")
            for c, u in zip(conditional, unconditional)]


def blend_keys(*keys: list[float]) -> list[float]:
    """Sort keys (ascending = preferred) that weigh several record signals alike: the mean of each record's
    percentile ranks under each key (ties share their mean rank; a NaN key ranks last)."""
    ranks = []
    for key in keys:
        values = np.array([np.inf if math.isnan(k) else k for k in key], dtype=float)
        order = np.argsort(values, kind="stable")
        rank = np.empty(len(values))
        rank[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):  # ties: their mean rank
            rank[values == v] = rank[values == v].mean()
        ranks.append(rank / max(len(values) - 1, 1))
    return np.mean(ranks, axis=0).tolist()


def member_scores(members: dict[int, list[str]], keys: dict[str, float]) -> dict[int, float]:
    """Each cluster's score from its members' record signal (sort keys, ascending = preferred, as `order_within`
    reads them): one minus their mean percentile rank among all the records (`blend_keys`: ties share a rank, a NaN
    key ranks last), so 1 when a cluster holds the pool's best records, 0 its worst."""
    ids = [rid for m in members.values() for rid in m]
    rank = dict(zip(ids, blend_keys([keys[rid] for rid in ids])))
    return {c: 1.0 - float(np.mean([rank[rid] for rid in m])) for c, m in members.items()}


def random_sample(ids: list[str], size: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 3])
    return [ids[i] for i in rng.choice(len(ids), size=size, replace=False)]


def dsir_sample(ids: list[str], log_weights: np.ndarray, size: int, seed: int) -> list[str]:
    """Importance resampling without replacement (Gumbel top-k, as DSIR's `resample`), heaviest key first."""
    rng = np.random.default_rng([seed, 4])
    keys = np.asarray(log_weights, dtype=float) + rng.gumbel(size=len(ids))
    return [ids[i] for i in np.argsort(-keys, kind="stable")[:size]]


def cluster_uniform(members: dict[int, list[str]], size: int, seed: int) -> list[str]:
    """Every cluster weighted equally (the ablation of the Shapley scores): a round robin over the clusters.

    Seeded by rng = default_rng([seed, 5]): first the cluster order, rng.permutation of the cluster
    ids sorted ascending; then each cluster's members, cluster by ascending id, shuffled by
    rng.permutation. Round r takes the r-th shuffled member of every cluster that has more than r
    members, in the cluster order; rounds go on until `size` records are taken, the last one cut
    short. So clusters that have not run out give counts that differ by at most one (the extra
    records go to the first in the cluster order), and a cluster that runs out gives all it has.
    Returned in the order taken.
    """
    rng = np.random.default_rng([seed, 5])
    clusters = sorted(members)
    position = {clusters[i]: p for p, i in enumerate(rng.permutation(len(clusters)))}
    shuffled = {c: [members[c][i] for i in rng.permutation(len(members[c]))] for c in clusters}
    # Record (round, cluster position) pairs in lexicographic order are the round robin's order.
    order = sorted((rank, position[c], record) for c in clusters for rank, record in enumerate(shuffled[c]))
    return [record for _, _, record in order[:size]]


def _ranked(ids: list[str], keys: list[float], size: int) -> list[str]:
    """The `size` ids of the smallest keys, ascending, ties by id; a NaN key ranks last."""
    ranked = sorted(zip(ids, keys), key=lambda pair: (math.isnan(pair[1]), 0.0 if math.isnan(pair[1]) else pair[1],
                                                      pair[0]))
    return [i for i, _ in ranked[:size]]


def longest_output(ids: list[str], output_chars: list[int], size: int) -> list[str]:
    """Longest responses first (Xia et al.'s length baseline): ids by `output_chars` (each record's
    `output` length in characters, Unicode code points, not tokens; a conversation's replies' together)
    descending, ties by id ascending."""
    return _ranked(ids, [-n for n in output_chars], size)


def lowest_loss(ids: list[str], losses: list[float], size: int) -> list[str]:
    """Lowest base-model loss first (a perplexity filter): ids by `losses` (each record's mean
    per-token negative log-likelihood of its response) ascending, ties by id ascending, NaN last."""
    return _ranked(ids, losses, size)


def highest_ifd(ids: list[str], values: list[float], size: int) -> list[str]:
    """Superfiltering / Cherry-LLM: the highest IFD below 1 first (`ifd_keys`), ties by id ascending."""
    return _ranked(ids, ifd_keys(values), size)
