"""cluster: seeded k-means into cluster.C clusters; each cluster's proxy is its member nearest the centroid.

    shed cluster                       # params.yaml: cluster.*

Outputs (data/clusters/): assignments.csv `id, cluster, distance, proxy` (pool order) and
proxies.csv `cluster, proxy_id, size`; a picture of the clusters in plots/clusters.png.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from shed import clustering, plots
from shed.config import Params
from shed.fileio import ShedError, atomic_path, write_csv, write_json
from shed.stages.embed import load_embeddings

log = logging.getLogger(__name__)

OUT_DIR = "data/clusters"
METRICS = "metrics/cluster.json"
PLOT = "plots/clusters.png"


def main(params: Params) -> None:
    cfg = params.cluster
    vectors, ids = load_embeddings()
    if cfg.C > len(ids):
        raise ShedError(f"params.yaml: cluster.C: {cfg.C} clusters asked for, but the pool has only {len(ids)} records")
    log.info("k-means: %d records into %d clusters (seed %d)", len(ids), cfg.C, cfg.seed)
    labels, centroids = clustering.kmeans(vectors, cfg.C, cfg.seed, cfg.algorithm)
    distances = clustering.distances_to_centroids(vectors, labels, centroids)
    proxy_rows = clustering.proxies(labels, distances)
    is_proxy = np.zeros(len(ids), dtype=bool)
    is_proxy[list(proxy_rows.values())] = True
    assignments = pd.DataFrame({"id": ids, "cluster": labels, "distance": distances.round(6), "proxy": is_proxy})
    sizes = np.bincount(labels, minlength=cfg.C)
    proxies = pd.DataFrame({"cluster": sorted(proxy_rows), "proxy_id": [ids[proxy_rows[c]] for c in sorted(proxy_rows)],
                            "size": [int(sizes[c]) for c in sorted(proxy_rows)]})
    with atomic_path(OUT_DIR) as tmp:
        tmp.mkdir()
        write_csv(tmp / "assignments.csv", assignments)
        write_csv(tmp / "proxies.csv", proxies)
    write_json(METRICS, {"clusters": int(len(proxies)), "size_min": int(sizes.min()),
                         "size_median": float(np.median(sizes)), "size_max": int(sizes.max())})
    plots.clusters_png(PLOT, vectors, labels, proxy_rows)
    log.info("clusters -> %s/, picture -> %s", OUT_DIR, PLOT)


def load_clusters() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(assignments, proxies) as written by this stage."""
    return (pd.read_csv(f"{OUT_DIR}/assignments.csv", dtype={"id": str}),
            pd.read_csv(f"{OUT_DIR}/proxies.csv", dtype={"proxy_id": str}))
