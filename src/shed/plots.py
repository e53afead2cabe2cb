"""Matplotlib pictures (PNG): they render offline, unlike DVC's vega plots, which load from a CDN."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from shed.fileio import atomic_path  # noqa: E402


def _save(fig, path: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def clusters_png(path: str, vectors: np.ndarray, labels: np.ndarray, proxy_rows: dict[int, int]) -> None:
    """Records in the plane of their two principal components, coloured by cluster; proxies ringed."""
    centered = vectors - vectors.mean(0)
    _, _, vt = np.linalg.svd(centered[:: max(1, len(centered) // 20000)], full_matrices=False)
    xy = centered @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab20", s=6, alpha=0.6, linewidths=0)
    rows = list(proxy_rows.values())
    ax.scatter(xy[rows, 0], xy[rows, 1], facecolors="none", edgecolors="black", s=30, linewidths=0.8, label="proxy")
    ax.set(title=f"{len(proxy_rows)} clusters of {len(labels)} records (PCA of embeddings)", xlabel="PC1", ylabel="PC2")
    ax.legend(loc="best")
    _save(fig, path)


def shapley_png(path: str, scores: np.ndarray, stderr: np.ndarray, sizes: np.ndarray) -> None:
    """Score distribution, and score against cluster size with standard errors."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(scores, bins=min(40, max(5, len(scores) // 3)), color="#4c72b0")
    left.axvline(0, color="black", lw=0.8)
    left.set(title="Shapley score of cluster proxies", xlabel="score", ylabel="clusters")
    right.errorbar(sizes, scores, yerr=np.nan_to_num(stderr), fmt="o", ms=3, alpha=0.7, elinewidth=0.6)
    right.axhline(0, color="black", lw=0.8)
    right.set(title="score against cluster size", xlabel="cluster size (records)", ylabel="score ± s.e.")
    _save(fig, path)


def convergence_png(path: str, rank_corr: list[float]) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(range(2, len(rank_corr) + 2), rank_corr, marker="o")
    ax.set(title="rank stability of cluster scores", xlabel="iterations (permutations)",
           ylabel="Spearman ρ with previous iteration", ylim=(min(0, min(rank_corr, default=0)), 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole
    _save(fig, path)


def accuracy_png(path: str, curves: dict[str, list[tuple[float, float, float]]], reference: dict[str, float],
                 title: str = "eval accuracy against subset size") -> None:
    """One line per method: (size, mean, std) points; horizontal lines for references (full pool, base)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, points in sorted(curves.items()):
        points = sorted(points)
        x, y, err = (np.array(v, dtype=float) for v in zip(*points))
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    for i, (name, value) in enumerate(sorted(reference.items())):
        ax.axhline(value, ls="--", lw=1, color=f"C{len(curves) + i}", label=name)
    ax.set(title=title, xlabel="subset size (fraction of the pool)", ylabel="accuracy")
    ax.legend(loc="best")
    _save(fig, path)
