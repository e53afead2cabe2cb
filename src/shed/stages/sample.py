"""sample: clusters and their Shapley scores -> the curated dataset, data/curated/dataset.jsonl.

    shed sample                        # params.yaml: sample.*
    # sample.method: qocs | qwcs | random | dsir | full | cluster_uniform | length | perplexity
    # sample.subset_size: 0.1 (fraction) or 5000 (records)

Baselines: dsir resamples the pool toward the dev questions' n-gram distribution (shed.dsir);
cluster_uniform weights every cluster equally; length takes the longest responses; perplexity takes
the responses of lowest loss under shapley.model, prompted with train.template (shed.sampling).

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


def cluster_members(assignments: pd.DataFrame) -> dict[int, list[str]]:
    """Each cluster's record ids, nearest the centroid first."""
    rows = members_by_distance(assignments["cluster"].to_numpy(), assignments["distance"].to_numpy())
    id_of = assignments["id"].to_numpy()
    return {c: id_of[r].tolist() for c, r in rows.items()}


def select(params: Params, pool: list[dict], assignments: pd.DataFrame, scores: pd.DataFrame,
           dev: list[dict] | None = None, losses: list[float] | None = None) -> list[str]:
    """Record ids chosen by sample.method (pure: no I/O); dsir needs the dev questions, perplexity
    each pool record's loss (`record_losses`, in pool order)."""
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
    if cfg.method == "length":
        return sampling.longest_output(ids, [len(r["output"]) for r in pool], size)
    if cfg.method == "perplexity":
        if losses is None or len(losses) != len(pool):
            raise ValueError("sample.method perplexity: select() needs one loss per pool record")
        return sampling.lowest_loss(ids, losses, size)
    members = cluster_members(assignments)
    if cfg.method == "cluster_uniform":
        return sampling.cluster_uniform(members, size, cfg.seed)
    cluster_scores = {int(c): float(s) for c, s in zip(scores["cluster"], scores["score"])}
    if set(cluster_scores) != set(members):
        raise ShedError(f"{artifacts.SCORES}: scores cover {len(cluster_scores)} clusters but the clustering has "
                        f"{len(members)} (rerun shapley)")
    if cfg.method == "qocs":
        return sampling.qocs(cluster_scores, members, size)
    return sampling.qwcs(cluster_scores, members, size, cfg.temperature, cfg.seed)


def response_losses(model, tokenizer, records: list[dict], template: str, max_length: int, batch_size: int,
                    progress=None) -> list[float]:
    """Each record's mean per-token negative log-likelihood of its response (the labelled tokens of
    `training.encode_record`) given its prompt, under `model`, in record order; inf for a record cut to
    no response token. `progress`: a tqdm-like bar, updated by the records of each batch."""
    from shed.scoring import token_logliks
    from shed.training import encode_record

    rows = []
    for record in records:
        ids, labels = encode_record(record, tokenizer, template, max_length)
        prompt = sum(label == -100 for label in labels)
        rows.append((ids[:prompt], ids[prompt:]))
    # Longest first: similar lengths share a batch (less padding), and a batch too big for memory fails at once.
    order = sorted(range(len(rows)), key=lambda i: -sum(map(len, rows[i])))
    scored = token_logliks(model, tokenizer, [rows[i] for i in order], batch_size, progress)
    losses = [float("inf")] * len(rows)
    for i, (total, count) in zip(order, scored):
        if count:
            losses[i] = -total / count
    return losses


def record_losses(params: Params, pool: list[dict]) -> list[float]:
    """`response_losses` of the pool under shapley.model (on shapley.device, in shapley.dtype), with the
    recipe's template and max_length, train.micro_batch records per forward pass (what fits a training
    step fits here, with no gradients)."""
    from tqdm import tqdm

    from shed.models import load_causal_lm, max_positions

    model, tokenizer = load_causal_lm(params.shapley.model, params.shapley.device, params.shapley.dtype)
    max_length = params.train.max_length or max_positions(model) or 0
    with tqdm(total=len(pool), desc="perplexity", unit="record") as bar:
        losses = response_losses(model, tokenizer, pool, params.train.template, max_length, params.train.micro_batch,
                                 progress=bar)
    cut = sum(loss == float("inf") for loss in losses)
    if cut:
        log.warning("perplexity: %d records keep no response token within %d tokens (train.max_length); they rank "
                    "last", cut, max_length)
    return losses


def main(params: Params) -> None:
    cfg = params.sample
    pool = artifacts.read_pool()
    assignments, _ = artifacts.read_clusters()
    scores = artifacts.read_scores()
    dev = artifacts.read_dev() if cfg.method == "dsir" else None
    losses = record_losses(params, pool) if cfg.method == "perplexity" else None
    chosen = select(params, pool, assignments, scores, dev, losses)
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
