"""cluster: seeded k-means into cluster.C clusters; each cluster's proxy is its member nearest the centroid.

    shed cluster                       # params.yaml: cluster.*

Outputs (data/clusters/): assignments.csv `id, cluster, distance, proxy` (pool order) and
proxies.csv `cluster, proxy_id, size`; a picture of the clusters in plots/clusters.png.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from shed import artifacts, clustering, plots
from shed.config import Params
from shed.fileio import ShedError, write_json

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    cfg = params.cluster
    vectors, ids = artifacts.read_embeddings()
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
    artifacts.write_clusters(assignments, proxies)
    write_json(artifacts.metrics("cluster"), {"clusters": int(len(proxies)), "size_min": int(sizes.min()),
                                              "size_median": float(np.median(sizes)), "size_max": int(sizes.max())})
    plots.clusters_png(artifacts.CLUSTERS_PNG, vectors, labels, proxy_rows)
    log.info("clusters -> %s/, picture -> %s", artifacts.CLUSTERS, artifacts.CLUSTERS_PNG)
