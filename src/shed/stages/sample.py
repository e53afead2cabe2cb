"""sample: clusters and their Shapley scores -> the curated dataset, data/curated/dataset.jsonl.

    shed sample                        # params.yaml: sample.*
    # sample.method: qocs | qwcs | random | dsir | full;  sample.subset_size: 0.1 (fraction) or 5000 (records)

dsir (baseline) resamples the pool toward the dev questions' n-gram distribution (shed.dsir).

Outputs (data/curated/): dataset.jsonl (records `{id, instruction, input, output}`, in selection
order) and manifest.json (method, size, seed, sha256 of the dataset, per-cluster counts).
"""

from __future__ import annotations

import logging

import pandas as pd

from shed import artifacts, dsir, sampling
from shed.clustering import members_by_distance
from shed.config import Params
from shed.fileio import ShedError
from shed.records import question_as_record, record_text

log = logging.getLogger(__name__)


def select(params: Params, pool: list[dict], assignments: pd.DataFrame, scores: pd.DataFrame,
           dev: list[dict] | None = None) -> list[str]:
    """Record ids chosen by sample.method (pure: no I/O); dsir needs the dev questions."""
    cfg = params.sample
    size = sampling.resolve_size(cfg.subset_size, len(pool))
    ids = [r["id"] for r in pool]
    if cfg.method == "full":
        return ids
    if cfg.method == "random":
        return sampling.random_sample(ids, size, cfg.seed)
    if cfg.method == "dsir":
        weights = dsir.log_importance_weights([record_text(r) for r in pool],
                                              [record_text(question_as_record(q)) for q in dev or []])
        return sampling.dsir_sample(ids, weights, size, cfg.seed)
    rows = members_by_distance(assignments["cluster"].to_numpy(), assignments["distance"].to_numpy())
    id_of = assignments["id"].to_numpy()
    members = {c: id_of[r].tolist() for c, r in rows.items()}
    cluster_scores = {int(c): float(s) for c, s in zip(scores["cluster"], scores["score"])}
    if set(cluster_scores) != set(members):
        raise ShedError(f"{artifacts.SCORES}: scores cover {len(cluster_scores)} clusters but the clustering has "
                        f"{len(members)} (rerun shapley)")
    if cfg.method == "qocs":
        return sampling.qocs(cluster_scores, members, size)
    return sampling.qwcs(cluster_scores, members, size, cfg.temperature, cfg.seed)


def main(params: Params) -> None:
    cfg = params.sample
    pool = artifacts.read_pool()
    assignments, _ = artifacts.read_clusters()
    scores = artifacts.read_scores()
    dev = artifacts.read_dev() if cfg.method == "dsir" else None
    chosen = select(params, pool, assignments, scores, dev)
    by_id = {r["id"]: r for r in pool}
    dataset = [by_id[i] for i in chosen]
    cluster_of = dict(zip(assignments["id"], assignments["cluster"].astype(int)))
    counts = pd.Series([cluster_of[i] for i in chosen]).value_counts().sort_index()
    digest = artifacts.write_curated(dataset, {
        "method": cfg.method, "size": len(dataset), "pool_size": len(pool), "fraction": len(dataset) / len(pool),
        "temperature": cfg.temperature if cfg.method == "qwcs" else None, "seed": cfg.seed,
        "clusters": {str(k): int(v) for k, v in counts.items()},
    })
    artifacts.write_metrics("sample", {"method": cfg.method, "size": len(dataset),
                                       "fraction": round(len(dataset) / len(pool), 6),
                                       "clusters_used": int(len(counts))})
    log.info("%s: %d of %d records from %d clusters -> %s (sha256 %s)", cfg.method, len(dataset), len(pool),
             len(counts), artifacts.DATASET, digest[:12])
