"""Harm metrics of the planted-pool benchmarks: how well scores flag what was planted, and how much of it a
selection keeps.

Inputs: record ids (str), the planted truth as a set of harmful ids or a kind per id ("" = clean), cluster
assignments {id: cluster} and scores (per cluster, per record or per proxy). Outputs: floats, or dicts of them;
NaN where a figure is undefined (one class only, an empty selection). Convention: a LOW score flags harm (an AUROC
of 1 = every harmful record scores below every clean one; 0.5 = no signal). Pure functions.
"""

from __future__ import annotations

import numpy as np


def auroc(labels: list[int], scores: list[float]) -> float:
    """How well a LOW score flags label 1 (NaN if only one class). A score of -inf or NaN (no score: a record
    cut to no response token) ranks below every finite one, +inf above."""
    from sklearn.metrics import roc_auc_score

    if len(set(labels)) < 2:
        return float("nan")
    values = np.asarray(scores, dtype=float)
    finite = values[np.isfinite(values)]
    low, high = (finite.min() - 1, finite.max() + 1) if len(finite) else (-1.0, 1.0)
    values = np.where(np.isnan(values) | (values == -np.inf), low, np.where(values == np.inf, high, values))
    return float(roc_auc_score(labels, -values))


def cluster_shares(cluster_of: dict[str, int], harmful: set[str]) -> dict[int, float]:
    """Each cluster's share of harmful members."""
    counts: dict[int, list[int]] = {}
    for rid, c in cluster_of.items():
        counts.setdefault(c, [0, 0])
        counts[c][0] += rid in harmful
        counts[c][1] += 1
    return {c: bad / total for c, (bad, total) in counts.items()}


def cluster_auroc(scores: dict[int, float], cluster_of: dict[str, int], harmful: set[str]) -> float:
    """Clusters with more than half their members harmful are corrupted: how well a low score flags them."""
    share = cluster_shares(cluster_of, harmful)
    clusters = sorted(scores)
    return auroc([int(share[c] > 0.5) for c in clusters], [scores[c] for c in clusters])


def record_auroc(scores: dict[int, float], cluster_of: dict[str, int], harmful: set[str]) -> float:
    """Each record inherits its cluster's score: how well a low score flags a harmful record."""
    ids = sorted(cluster_of)
    return auroc([int(i in harmful) for i in ids], [scores[cluster_of[i]] for i in ids])


def harm_in_bad_clusters(cluster_of: dict[str, int], harmful: set[str]) -> float:
    """Share of the harmful records inside mostly harmful clusters: the ceiling of any cluster-level score."""
    share = cluster_shares(cluster_of, harmful)
    inside = sum(1 for i in harmful if i in cluster_of and share[cluster_of[i]] > 0.5)
    return inside / max(sum(1 for i in harmful if i in cluster_of), 1)


def proxy_reading(scores: dict[str, float], kind_of: dict[str, str]) -> tuple[float, dict[str, float]]:
    """The proxies' own scores against what was planted in them: (how well a low score flags a corrupted proxy,
    each kind's mean percentile rank of score, "clean" for the uncorrupted; 1 = the highest scores)."""
    ids = sorted(scores)
    values = np.array([scores[i] for i in ids], dtype=float)
    ranks = (np.argsort(np.argsort(values, kind="stable"), kind="stable") + 1) / len(ids)
    kinds = [kind_of[i] or "clean" for i in ids]
    by_kind = {k: float(np.mean([r for r, kk in zip(ranks, kinds) if kk == k])) for k in sorted(set(kinds))}
    return auroc([int(k != "clean") for k in kinds], values), by_kind


def harmful_share(ids: list[str], harmful: set[str]) -> float:
    """Share of `ids` that are harmful (NaN for none)."""
    return sum(i in harmful for i in ids) / len(ids) if ids else float("nan")


def kind_shares(ids: list[str], kind_of: dict[str, str]) -> dict[str, float]:
    """Share of `ids` of each planted kind, for every kind in `kind_of` but "" (clean; not reported): 0.0 for a kind
    none of `ids` has, NaN for all when `ids` is empty."""
    kinds = sorted({k for k in kind_of.values() if k})
    if not ids:
        return {k: float("nan") for k in kinds}
    return {k: sum(kind_of.get(i) == k for i in ids) / len(ids) for k in kinds}


def kind_auroc(score_of_record: dict[str, float], kind_of: dict[str, str]) -> dict[str, float]:
    """Per planted kind: how well a LOW record score flags the records of that kind against the clean records
    (kind ""), over the records that have both a score and a kind (NaN for a kind when no record is clean)."""
    ids = sorted(i for i in score_of_record if i in kind_of)
    clean = [score_of_record[i] for i in ids if not kind_of[i]]
    out = {}
    for kind in sorted({kind_of[i] for i in ids if kind_of[i]}):
        bad = [score_of_record[i] for i in ids if kind_of[i] == kind]
        out[kind] = auroc([1] * len(bad) + [0] * len(clean), bad + clean)
    return out


def record_level_auroc(score_of_record: dict[str, float], harmful: set[str]) -> float:
    """How well a LOW record score flags a harmful record (each record its own score, e.g. perplexity)."""
    ids = sorted(score_of_record)
    return auroc([int(i in harmful) for i in ids], [score_of_record[i] for i in ids])
