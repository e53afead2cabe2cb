"""cluster: seeded k-means into cluster.C clusters; each cluster's proxy is its member nearest the centroid.

    shed cluster                       # params.yaml: cluster.*

Outputs (data/clusters/): assignments.csv `id, cluster, distance, proxy` (pool order),
proxies.csv `cluster, proxy_id, size` and duplicates.csv `id, kept_id, similarity` (pool order of id;
cluster.dedup_threshold > 0: each record within its cluster closer than the threshold to one kept before it,
`clustering.near_duplicates`; the header alone when 0); a picture of the clusters in plots/clusters.png
(at most 50k records of a larger pool, every proxy among them). cluster.algorithm faiss: FAISS k-means for
large pools. A cluster left empty is dropped (clusters renumbered) and counted in metrics/cluster.json
(empty_dropped), as are the near-duplicates (duplicates).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from shed import artifacts, clustering, plots, streaming
from shed.config import Params
from shed.fileio import ShedError

log = logging.getLogger(__name__)


PLOT_RECORDS = 50_000  # the picture shows at most this many records (all proxies among them)


def main(params: Params) -> None:
    cfg = params.cluster
    vectors, ids = artifacts.read_embeddings(mmap=True)  # memory-mapped: read once, never copied whole
    if cfg.C > len(ids):
        raise ShedError(f"params.yaml: cluster.C: {cfg.C} clusters asked for, but the pool has only {len(ids)} records")
    log.info("k-means (%s): %d records into %d clusters (seed %d)", cfg.algorithm, len(ids), cfg.C, cfg.seed)
    labels, centroids = clustering.kmeans(vectors, cfg.C, cfg.seed, cfg.algorithm)
    distances = clustering.distances_to_centroids(vectors, labels, centroids)
    proxy_rows = clustering.proxies(labels, distances)
    is_proxy = np.zeros(len(ids), dtype=bool)
    is_proxy[list(proxy_rows.values())] = True
    assignments = pd.DataFrame({"id": ids, "cluster": labels, "distance": distances.round(6), "proxy": is_proxy})
    sizes = np.bincount(labels)
    clusters = np.array(sorted(proxy_rows))
    id_array = np.asarray(ids, dtype=object)
    proxies = pd.DataFrame({"cluster": clusters, "proxy_id": id_array[[proxy_rows[c] for c in clusters]],
                            "size": sizes[clusters]})
    duplicate, kept, similarity = clustering.near_duplicates(vectors, labels, distances, cfg.dedup_threshold)
    duplicates = pd.DataFrame({"id": id_array[duplicate], "kept_id": id_array[kept],
                               "similarity": similarity.astype(np.float64).round(6)})
    if len(duplicates):
        log.info("near-duplicates (cosine > %g within a cluster): %d of %d records", cfg.dedup_threshold,
                 len(duplicates), len(ids))
    artifacts.write_clusters(assignments, proxies, duplicates)
    artifacts.write_metrics("cluster", {"clusters": int(len(proxies)), "size_min": int(sizes.min()),
                                        "size_median": float(np.median(sizes)), "size_max": int(sizes.max()),
                                        "empty_dropped": clustering.empty_clusters(cfg.C, labels),
                                        "duplicates": int(len(duplicates)), "peak_rss_mb": streaming.peak_rss_mb()})
    rows = np.arange(len(ids))
    if len(ids) > PLOT_RECORDS:  # a sample of the records (every proxy among them) keeps the picture cheap
        rows = np.union1d(rows[:: -(-len(ids) // PLOT_RECORDS)], list(proxy_rows.values()))
        log.info("picture: %d of %d records", len(rows), len(ids))
    position = np.searchsorted(rows, list(proxy_rows.values()))
    plots.clusters_png(artifacts.CLUSTERS_PNG, np.asarray(vectors[rows]), labels[rows],
                       dict(zip(proxy_rows, position.tolist())))
    log.info("clusters -> %s/, picture -> %s", artifacts.CLUSTERS, artifacts.CLUSTERS_PNG)
