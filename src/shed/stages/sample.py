"""sample: clusters and their Shapley scores -> the curated dataset, data/curated/dataset.jsonl.

    shed sample                        # params.yaml: sample.*
    # sample.method: qocs | qwcs | random | dsir | full;  sample.subset_size: 0.1 (fraction) or 5000 (records)

dsir (baseline) resamples the pool toward the dev questions' n-gram distribution (shed.dsir).

Outputs (data/curated/): dataset.jsonl (records `{id, instruction, input, output}`, in selection
order) and manifest.json (method, size, seed, sha256 of the dataset, per-cluster counts).
"""

from __future__ import annotations

import hashlib
import logging

import pandas as pd

from shed import dsir, sampling
from shed.config import Params
from shed.fileio import ShedError, atomic_path, read_jsonl, write_json, write_jsonl
from shed.stages.cluster import load_clusters

log = logging.getLogger(__name__)

POOL = "data/prepared/pool.jsonl"
DEV = "data/prepared/dev.jsonl"
SCORES = "data/shapley/scores.csv"
OUT_DIR = "data/curated"
METRICS = "metrics/sample.json"


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
        texts = ["\n".join(r[f] for f in ("instruction", "input", "output") if r.get(f)) for r in pool]
        weights = dsir.log_importance_weights(texts, [dsir.question_text(q) for q in dev or []])
        return sampling.dsir_sample(ids, weights, size, cfg.seed)
    ordered = assignments.sort_values(["cluster", "distance", "id"], kind="stable")
    members = {int(c): list(g["id"]) for c, g in ordered.groupby("cluster", sort=True)}
    cluster_scores = {int(c): float(s) for c, s in zip(scores["cluster"], scores["score"])}
    if set(cluster_scores) != set(members):
        raise ShedError(f"{SCORES}: scores cover {len(cluster_scores)} clusters but the clustering has "
                        f"{len(members)} (rerun shapley)")
    if cfg.method == "qocs":
        return sampling.qocs(cluster_scores, members, size)
    return sampling.qwcs(cluster_scores, members, size, cfg.temperature, cfg.seed)


def main(params: Params) -> None:
    cfg = params.sample
    pool = read_jsonl(POOL)
    assignments, _ = load_clusters()
    scores = pd.read_csv(SCORES)
    dev = read_jsonl(DEV) if cfg.method == "dsir" else None
    chosen = select(params, pool, assignments, scores, dev)
    by_id = {r["id"]: r for r in pool}
    dataset = [by_id[i] for i in chosen]
    cluster_of = dict(zip(assignments["id"], assignments["cluster"].astype(int)))
    with atomic_path(OUT_DIR) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / "dataset.jsonl", dataset)
        digest = hashlib.sha256((tmp / "dataset.jsonl").read_bytes()).hexdigest()
        counts = pd.Series([cluster_of[i] for i in chosen]).value_counts().sort_index()
        write_json(tmp / "manifest.json", {
            "method": cfg.method, "size": len(dataset), "pool_size": len(pool), "fraction": len(dataset) / len(pool),
            "temperature": cfg.temperature if cfg.method == "qwcs" else None, "seed": cfg.seed,
            "sha256": digest, "clusters": {str(k): int(v) for k, v in counts.items()},
        })
    write_json(METRICS, {"method": cfg.method, "size": len(dataset), "fraction": round(len(dataset) / len(pool), 6),
                         "clusters_used": int(len(counts))})
    log.info("%s: %d of %d records from %d clusters -> %s/dataset.jsonl (sha256 %s)", cfg.method, len(dataset),
             len(pool), len(counts), OUT_DIR, digest[:12])
