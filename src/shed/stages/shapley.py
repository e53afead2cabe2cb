"""shapley: value each cluster's proxy with the proxy-based Shapley estimator of SPEC.md.

    shed shapley                       # params.yaml: shapley.*, train.*
    dvc exp run -S shapley.dev_neighbours=0   # the paper's single game on the whole dev set

Utility v(S) = dev score of shapley.model after fine-tuning a fresh LoRA adapter on the proxies
in S (v(∅) = the base model, measured). The estimator (shapley.estimator) fixes its subsets up
front; the missing ones run in-process, in shapley.workers processes, or on Ray (shed.executors),
each worker loading the model once. Each job re-initialises the adapter from train.seed, the same
for every subset (common random numbers), so a subset's value does not depend on when or where
it ran, and two subsets' values differ by their data alone. Every evaluation is
appended to data/shapley_jobs/jobs.jsonl the moment it completes (a persistent DVC output): a
rerun after a crash, or with a larger k, reuses every finished job.

With shapley.dev_neighbours = m > 0, each proxy is valued in its own game: the mean per-question
dev score over the m dev questions nearest it (embed.model space, record and question embedded
alike). One proxy's effect on the whole dev set is a small change buried in how the other
proxies' fine-tune shifted every question; on the questions like it, it stands out
(docs/results.md). The jobs are the same; each records its per-question scores, and the
estimator, linear in the values, runs once on the vector game (shed.shapley.local_values).

Outputs: data/shapley/scores.csv `cluster, proxy_id, size, score, stderr, credits`,
data/shapley/subsets.jsonl (each evaluated subset and its value), metrics/shapley.json,
plots/shapley_scores.csv, plots/shapley.png, plots/convergence.png.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from shed import artifacts, plots
from shed.config import Params
from shed.embedding import embed_texts
from shed.executors import JobSpec, run_jobs
from shed.fileio import ShedError, write_csv, write_json
from shed.jobstore import JobStore, job_context, subset_key
from shed.records import question_as_record, record_text
from shed.shapley import ESTIMATORS, local_values, schedule

log = logging.getLogger(__name__)


def spearman_between_iterations(estimates: list[dict]) -> list[float]:
    """Rank correlation of the running cluster scores after iteration i and i-1 (i >= 2)."""
    out = []
    for prev, cur in zip(estimates, estimates[1:]):
        keys = sorted(cur)
        a = pd.Series([prev[k] for k in keys]).rank()
        b = pd.Series([cur[k] for k in keys]).rank()
        out.append(float(a.corr(b)) if a.std() > 0 and b.std() > 0 else 0.0)
    return out


def missing_jobs(subsets: list[frozenset], proxy_records: dict[int, dict], store: JobStore, seed: int,
                 need_questions: bool) -> list[dict]:
    """The jobs of `subsets` not in the store (local games also need each job's per-question scores)."""
    jobs = []
    for subset in subsets:
        records = [proxy_records[c] for c in sorted(subset)]
        key = subset_key([r["id"] for r in records])
        if not store.has(key, questions=need_questions):
            # Every job starts from the same adapter init and shuffle (common random numbers):
            # v(S ∪ {i}) - v(S) then measures what record i does, not the gap between two random
            # inits, which on small subsets dwarfs it. A value still depends on nothing but its subset.
            jobs.append({"key": key, "records": records, "seed": seed})
    return jobs


def run_and_record(spec: JobSpec, jobs: list[dict], store: JobStore, workers: int, executor: str) -> dict:
    """Run `jobs`, storing each result the moment it arrives; returns timing totals."""
    stats = {"jobs_run": len(jobs), "train": 0.0, "score": 0.0, "job": 0.0, "record": 0.0, "setup": 0.0,
             "wall": 0.0}
    if not jobs:
        return stats
    log.info("running %d new jobs (%s executor, %d worker(s))", len(jobs), executor, workers)
    start = time.perf_counter()
    with tqdm(total=len(jobs), desc="shapley jobs", unit="job") as bar:
        for result in run_jobs(spec, jobs, workers, executor):
            t0 = time.perf_counter()
            store.put(result["key"], result["value"], result["questions"], size=result["size"],
                      train_loss=result["train_loss"], train_seconds=round(result["train_seconds"], 3),
                      score_seconds=round(result["score_seconds"], 3))
            stats["record"] += time.perf_counter() - t0
            for part in ("train", "score", "job"):
                stats[part] += result[f"{part}_seconds"]
            stats["setup"] = max(stats["setup"], result["setup_seconds"])  # workers load in parallel
            bar.update(1)
            bar.set_postfix(size=result["size"], v=f"{result['value']:.4f}")
    stats["wall"] = time.perf_counter() - start
    return stats


def nearest_questions(params: Params, dev: list[dict], proxy_ids: list[str]) -> np.ndarray:
    """Row i: the indices of the shapley.dev_neighbours dev questions nearest proxy i (cosine, in
    the embed stage's space; a question embedded as the record that teaches its correct choice)."""
    vectors, ids = artifacts.read_embeddings(mmap=True)  # only the C proxy rows are read
    row = {rid: i for i, rid in enumerate(ids)}
    missing = [p for p in proxy_ids if p not in row]
    if missing:
        raise ShedError(f"{artifacts.EMBED_IDS}: proxy record {missing[0]} has no embedding (rerun embed and cluster)")
    proxies = vectors[[row[p] for p in proxy_ids]]
    texts = [record_text(question_as_record(q), params.embed.fields) for q in dev]
    questions = embed_texts(texts, params.embed.model, params.embed.batch_size, params.embed.device,
                            params.embed.max_seq_length)
    similarity = np.asarray(proxies, dtype=np.float64) @ questions.T.astype(np.float64)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :params.shapley.dev_neighbours]  # ties: earlier question


def main(params: Params) -> None:
    cfg = params.shapley
    start = time.perf_counter()
    pool = {r["id"]: r for r in artifacts.read_pool()}
    dev = artifacts.read_dev()
    _, proxies = artifacts.read_clusters()
    missing = [p for p in proxies["proxy_id"] if p not in pool]
    if missing:
        raise ShedError(f"{artifacts.POOL}: proxy record {missing[0]} is not in the pool (rerun prepare, embed, cluster)")
    players = [int(c) for c in proxies["cluster"]]
    proxy_records = {int(c): pool[p] for c, p in zip(proxies["cluster"], proxies["proxy_id"])}
    if cfg.n > len(players):
        raise ShedError(f"params.yaml: shapley.n: {cfg.n} is larger than the {len(players)} proxies")
    if cfg.dev_neighbours > len(dev):
        raise ShedError(f"params.yaml: shapley.dev_neighbours: {cfg.dev_neighbours} is more than the {len(dev)} "
                        f"questions in {artifacts.DEV}")
    # Before any fine-tune: a missing embedding or embedding model stops the run now, not after the jobs.
    near = nearest_questions(params, dev, [proxy_records[c]["id"] for c in players]) if cfg.dev_neighbours else None

    # The estimators fix their subsets before seeing any value: evaluate them all (in parallel
    # where configured), then let the estimator read the recorded values in its own order.
    subsets = schedule(cfg.estimator, players, cfg.k, cfg.n, cfg.seed)
    log.info("Shapley (%s): %d proxies, k=%d, n=%d -> %d distinct fine-tune-and-score jobs",
             cfg.estimator, len(players), cfg.k, cfg.n, len(subsets))
    spec = JobSpec(model=cfg.model, device=cfg.device, dtype=cfg.dtype, train=params.train, value=cfg.value,
                   dev=dev, dev_path=str(Path(artifacts.DEV).resolve()))
    with JobStore(artifacts.JOBS, job_context(cfg.model, params.train, cfg.value, [q["id"] for q in dev])) as store:
        jobs = missing_jobs(subsets, proxy_records, store, params.train.seed, need_questions=bool(cfg.dev_neighbours))
        stats = run_and_record(spec, jobs, store, cfg.workers, cfg.executor)
    reused = len(subsets) - stats["jobs_run"]

    def key(s: frozenset) -> str:
        return subset_key([proxy_records[c]["id"] for c in s])

    if near is not None:
        log.info("each proxy valued on its %d nearest dev questions (of %d)", cfg.dev_neighbours, len(dev))
        vector = ESTIMATORS[cfg.estimator](players, lambda s: np.array(store.questions[key(s)]), k=cfg.k, n=cfg.n,
                                           seed=cfg.seed)
        result = local_values(vector, dict(zip(players, near)))
    else:
        result = ESTIMATORS[cfg.estimator](players, lambda s: store.values[key(s)], k=cfg.k, n=cfg.n, seed=cfg.seed)

    sizes = dict(zip(proxies["cluster"].astype(int), proxies["size"].astype(int)))
    scores = pd.DataFrame({
        "cluster": players,
        "proxy_id": [proxy_records[c]["id"] for c in players],
        "size": [sizes[c] for c in players],
        "score": [result.values[c] for c in players],
        "stderr": [result.stderr[c] for c in players],
        "credits": [len(result.credits[c]) for c in players],
    })
    artifacts.write_scores(scores, [{"clusters": sorted(int(c) for c in s), "size": len(s),
                                     "value": store.values[key(s)]} for s in result.evaluations])
    write_csv(artifacts.SCORES_PLOT, scores.sort_values(["score", "cluster"], ascending=[False, True])
              .assign(rank=range(len(scores)))[["rank", "cluster", "size", "score", "stderr"]])
    rank_corr = spearman_between_iterations(result.estimates)
    plots.shapley_png(artifacts.SHAPLEY_PNG, scores["score"].to_numpy(), scores["stderr"].to_numpy(),
                      scores["size"].to_numpy())
    plots.convergence_png(artifacts.CONVERGENCE_PNG, rank_corr)
    v_full = store.values[key(frozenset(players))]
    v_empty = store.values[key(frozenset())]
    run = max(stats["jobs_run"], 1)
    write_json(artifacts.metrics("shapley"), {
        "estimator": cfg.estimator, "executor": cfg.executor, "workers": cfg.workers,
        "jobs": len(result.evaluations), "jobs_reused": reused, "jobs_run": stats["jobs_run"],
        "v_full": v_full, "v_empty": v_empty,
        "value": cfg.value, "dev_neighbours": cfg.dev_neighbours, "score_mean": float(scores["score"].mean()),
        "stderr_mean": float(np.nanmean(scores["stderr"])) if cfg.k > 1 else None,
        "rank_stability": rank_corr[-1] if rank_corr else None,
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_setup": round(stats["setup"], 2),
        "seconds_train": round(stats["train"], 1), "seconds_score": round(stats["score"], 1),
        # Per job, everything but training and scoring: seeding, batching, IPC, recording (fsync).
        "seconds_overhead": round((stats["job"] - stats["train"] - stats["score"] + stats["record"]) / run, 4),
        "jobs_per_minute": round(60 * stats["jobs_run"] / stats["wall"], 1) if stats["jobs_run"] else None,
    })
    log.info("v(P)=%.4f v(∅)=%.4f; %d jobs (%d reused); scores -> %s, pictures -> %s", v_full, v_empty,
             len(result.evaluations), reused, artifacts.SCORES, artifacts.SHAPLEY_PNG)
