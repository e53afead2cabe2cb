"""shapley: value each cluster's proxy with the proxy-based Shapley estimator of SPEC.md.

    shed shapley                       # params.yaml: shapley.*, train.*

Utility v(S) = dev score of shapley.model after fine-tuning a fresh LoRA adapter on the proxies
in S (v(∅) = the base model, measured). The model, tokenizer and dev set load once; each job
re-initialises the adapter from a seed derived from its subset, so a subset's value does not
depend on when or where it ran. Every evaluation is appended to data/shapley/jobs.jsonl the
moment it completes (a persistent DVC output): a rerun after a crash, or with a larger k,
reuses every finished job.

Outputs: data/shapley/scores.csv `cluster, proxy_id, size, score, stderr, credits`,
data/shapley/subsets.jsonl (each evaluated subset and its value), metrics/shapley.json,
plots/shapley_scores.csv, plots/shapley.png, plots/convergence.png.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from shed import plots
from shed.config import Params, ShapleyConfig, TrainConfig, as_dict
from shed.io import ShedError, atomic_path, log, read_jsonl, write_csv, write_json, write_jsonl
from shed.shapley import ESTIMATORS, job_count
from shed.stages.cluster import load_clusters

POOL = "data/prepared/pool.jsonl"
DEV = "data/prepared/dev.jsonl"
OUT_DIR = "data/shapley"
JOBS = "data/shapley_jobs/jobs.jsonl"
METRICS = "metrics/shapley.json"
SCORES_PLOT = "plots/shapley_scores.csv"
PNG = "plots/shapley.png"
CONVERGENCE_PNG = "plots/convergence.png"


def model_fingerprint(name_or_path: str) -> str:
    """Identifies the model's weights without reading all of them (7B checkpoints are 14 GB)."""
    path = Path(name_or_path)
    if not path.exists():
        return name_or_path  # a hub id
    digest = hashlib.sha256()
    for f in sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file()):
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read())
    return digest.hexdigest()


def job_context(cfg: ShapleyConfig, train: TrainConfig, dev: list[dict]) -> str:
    """Everything besides the subset that determines a job's value; jobs of another context are never reused."""
    blob = json.dumps({"model": model_fingerprint(cfg.model), "train": as_dict(train), "value": cfg.value,
                       "dev": [q["id"] for q in dev]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def subset_key(proxy_ids: list[str]) -> str:
    return hashlib.sha256(",".join(sorted(proxy_ids)).encode()).hexdigest()[:20]


def job_seed(train_seed: int, key: str) -> int:
    return (train_seed * 1_000_003 + int(key[:8], 16)) % (2**31)


class JobStore:
    """Append-only record of finished utility evaluations: one JSON line, flushed and fsynced, per job."""

    def __init__(self, path: str | Path, context: str):
        self.path, self.context = Path(path), context
        self.values: dict[str, float] = {}
        self.reused = 0
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for i, line in enumerate(lines):
                try:
                    job = json.loads(line)
                except json.JSONDecodeError:
                    # Only a crash mid-write can leave a bad line, and only as the last one.
                    log.warning("%s: line %d is incomplete (interrupted write); ignoring it", self.path, i + 1)
                    continue
                if job.get("context") == context:
                    self.values[job["key"]] = job["value"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        log.info("job store %s: %d finished jobs for this model/recipe/dev set", self.path, len(self.values))

    def get(self, key: str) -> float | None:
        value = self.values.get(key)
        if value is not None:
            self.reused += 1
        return value

    def put(self, key: str, value: float, **info) -> None:
        self.values[key] = value
        self._fh.write(json.dumps({"context": self.context, "key": key, "value": value, **info}, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


class ProxyUtility:
    """v(S): fine-tune a fresh LoRA adapter on the proxies of clusters S, score it on the dev set."""

    def __init__(self, params: Params, proxy_records: dict[int, dict], dev: list[dict], store: JobStore):
        from shed.models import load_causal_lm
        from shed.training import LoraTrainer

        cfg = params.shapley
        self.proxy_records, self.dev, self.store = proxy_records, dev, store
        self.train_seed = params.train.seed
        model, self.tokenizer = load_causal_lm(cfg.model, cfg.device, cfg.dtype)
        self.trainer = LoraTrainer(model, self.tokenizer, params.train)
        self.value_kind = cfg.value
        if cfg.value == "accuracy":
            from shed.scoring import LmEvalScorer, mc_task_config

            self.scorer = LmEvalScorer(self.tokenizer, [mc_task_config("shed_dev", DEV)])
        self.progress: tqdm | None = None
        self.seconds = {"train": 0.0, "score": 0.0}

    def score(self) -> float:
        from shed.scoring import gold_loglik

        if self.value_kind == "loglik":
            return gold_loglik(self.trainer.model, self.tokenizer, self.dev)
        return self.scorer(self.trainer.model)["shed_dev"]["acc"]

    def __call__(self, subset: frozenset) -> float:
        records = [self.proxy_records[c] for c in sorted(subset)]
        key = subset_key([r["id"] for r in records])
        cached = self.store.get(key)
        if cached is not None:
            value = cached
        else:
            t0 = time.perf_counter()
            fit = self.trainer.fit(records, seed=job_seed(self.train_seed, key))
            t1 = time.perf_counter()
            value = self.score()
            t2 = time.perf_counter()
            self.seconds["train"] += t1 - t0
            self.seconds["score"] += t2 - t1
            self.store.put(key, value, size=len(records), train_seconds=round(t1 - t0, 3),
                           score_seconds=round(t2 - t1, 3), train_loss=fit["loss"])
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(size=len(records), v=f"{value:.4f}")
        return value


def spearman_between_iterations(estimates: list[dict]) -> list[float]:
    """Rank correlation of the running cluster scores after iteration i and i-1 (i >= 2)."""
    out = []
    for prev, cur in zip(estimates, estimates[1:]):
        keys = sorted(cur)
        a = pd.Series([prev[k] for k in keys]).rank()
        b = pd.Series([cur[k] for k in keys]).rank()
        out.append(float(a.corr(b)) if a.std() > 0 and b.std() > 0 else 0.0)
    return out


def main(params: Params) -> None:
    cfg = params.shapley
    start = time.perf_counter()
    pool = {r["id"]: r for r in read_jsonl(POOL)}
    dev = read_jsonl(DEV)
    _, proxies = load_clusters()
    missing = [p for p in proxies["proxy_id"] if p not in pool]
    if missing:
        raise ShedError(f"{POOL}: proxy record {missing[0]} is not in the pool (rerun prepare, embed, cluster)")
    players = [int(c) for c in proxies["cluster"]]
    proxy_records = {int(c): pool[p] for c, p in zip(proxies["cluster"], proxies["proxy_id"])}
    if cfg.n > len(players):
        raise ShedError(f"params.yaml: shapley.n: {cfg.n} is larger than the {len(players)} proxies")

    store = JobStore(JOBS, job_context(cfg, params.train, dev))
    utility = ProxyUtility(params, proxy_records, dev, store)
    total = job_count(len(players), cfg.k, cfg.n)
    log.info("Shapley: %d proxies, k=%d, n=%d -> %d distinct fine-tune-and-score jobs", len(players), cfg.k, cfg.n, total)
    try:
        with tqdm(total=total, desc="shapley jobs", unit="job") as bar:
            utility.progress = bar
            result = ESTIMATORS[cfg.estimator](players, utility, k=cfg.k, n=cfg.n, seed=cfg.seed)
    finally:
        store.close()

    sizes = dict(zip(proxies["cluster"].astype(int), proxies["size"].astype(int)))
    scores = pd.DataFrame({
        "cluster": players,
        "proxy_id": [proxy_records[c]["id"] for c in players],
        "size": [sizes[c] for c in players],
        "score": [result.values[c] for c in players],
        "stderr": [result.stderr[c] for c in players],
        "credits": [len(result.credits[c]) for c in players],
    })
    subsets = [{"clusters": sorted(int(c) for c in s), "size": len(s), "value": v} for s, v in result.evaluations.items()]
    with atomic_path(OUT_DIR) as tmp:
        tmp.mkdir()
        write_csv(tmp / "scores.csv", scores)
        write_jsonl(tmp / "subsets.jsonl", subsets)
    write_csv(SCORES_PLOT, scores.sort_values(["score", "cluster"], ascending=[False, True])
              .assign(rank=range(len(scores)))[["rank", "cluster", "size", "score", "stderr"]])
    rank_corr = spearman_between_iterations(result.estimates)
    plots.shapley_png(PNG, scores["score"].to_numpy(), scores["stderr"].to_numpy(), scores["size"].to_numpy())
    plots.convergence_png(CONVERGENCE_PNG, rank_corr)
    v_full = result.evaluations[frozenset(players)]
    v_empty = result.evaluations[frozenset()]
    write_json(METRICS, {
        "jobs": len(result.evaluations), "jobs_reused": store.reused, "v_full": v_full, "v_empty": v_empty,
        "value": cfg.value, "score_mean": float(scores["score"].mean()),
        "rank_stability": rank_corr[-1] if rank_corr else None,
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_train": round(utility.seconds["train"], 1), "seconds_score": round(utility.seconds["score"], 1),
    })
    log.info("v(P)=%.4f v(∅)=%.4f; %d jobs (%d reused); scores -> %s/scores.csv, pictures -> %s", v_full, v_empty,
             len(result.evaluations), store.reused, OUT_DIR, PNG)
