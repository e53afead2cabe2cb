"""Every artifact the pipeline writes: its path, the stage that owns it, and its reader and writer.

Stages import this module (never each other); dvc.yaml's outs and data deps are checked against
`OUTPUTS` and `INPUTS` by tests/test_structure.py. Paths are relative to the project root.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from shed import env
from shed.fileio import (ShedError, atomic_path, json_line, jsonl_row, read_jsonl, row_line, write_csv, write_json,
                         write_jsonl)

# prepare
PREPARED = "data/prepared"
POOL = f"{PREPARED}/pool.jsonl"  # {id, instruction, input, output}
# {id, source, at, row}: each pool record's row as the user gave it, and where ("line N", "row N", "item N" of source)
ROWS = f"{PREPARED}/rows.jsonl"
DEV = f"{PREPARED}/dev.jsonl"  # {id, question, choices, answer}: the Shapley value function's questions
EVAL = f"{PREPARED}/eval.jsonl"  # the evaluate stage's questions (never the dev questions)
TRUTH = f"{PREPARED}/truth.jsonl"  # the embedded pool's planted harm: benchmarks read it, the method never
# base
BASE_MODEL = "models/base"
BASE_SKIPPED = f"{BASE_MODEL}/skipped.json"  # {reason}: instead of the weights when no configured model is models/base
# embed
EMBED = "data/embed"
EMBEDDINGS = f"{EMBED}/embeddings.npy"  # float32, row i = the record on line i of ids.txt
EMBED_IDS = f"{EMBED}/ids.txt"
EMBED_PARTIAL = "data/.embed.partial"  # an unfinished embed run: its chunks so far (resume), never a DVC output
# cluster
CLUSTERS = "data/clusters"
ASSIGNMENTS = f"{CLUSTERS}/assignments.csv"  # id, cluster, distance, proxy (pool order)
PROXIES = f"{CLUSTERS}/proxies.csv"  # cluster, proxy_id, size
DUPLICATES = f"{CLUSTERS}/duplicates.csv"  # id, kept_id, similarity: near-duplicates the sample stage leaves out
CLUSTERS_PNG = "plots/clusters.png"
# shapley
SHAPLEY = "data/shapley"
SCORES = f"{SHAPLEY}/scores.csv"  # cluster, proxy_id, size, score, stderr, credits
RECORD_SCORES = f"{SHAPLEY}/record_scores.csv"  # id, cluster, score, stderr, tokens, loss: every valued record
SUBSETS = f"{SHAPLEY}/subsets.jsonl"  # retrain: each evaluated subset and its value; inrun: one summary per run
JOBS_DIR = "data/shapley_jobs"
JOBS = f"{JOBS_DIR}/jobs.jsonl"  # the persistent job store (shed.jobstore)
FORWARD_RUNS = f"{JOBS_DIR}/forward"  # shapley.method forward: <context>/base.npy, run-NNNN.{npy,json}
INRUN_RUNS = f"{JOBS_DIR}/inrun"  # shapley.method inrun: <context>/run-NNNN.{safetensors,json}, one per finished run
SCORES_PLOT = "plots/shapley_scores.csv"
SHAPLEY_PNG = "plots/shapley.png"
CONVERGENCE_PNG = "plots/convergence.png"
# sample
CURATED = "data/curated"
DATASET = f"{CURATED}/dataset.jsonl"  # the curated records' original rows, as the user gave them, in selection order
CURATED_RECORDS = f"{CURATED}/records.jsonl"  # {id, source, at} of each row of DATASET, line for line
MANIFEST = f"{CURATED}/manifest.json"
# finetune
FINETUNED = "models/finetuned"
FINETUNE_CURVE = "dvclive/finetune/plots/metrics"  # dvclive's per-step loss.tsv and lr.tsv: dvc plots
# dvclive series of the valuation's training: retrain: value.tsv and size.tsv per job (step = the job's place in
# the estimator's order); inrun: run-<r>/loss.tsv per step of run r; forward: run-<r>/dev_loss.tsv, the dev
# loss before (step 0) and after (step 1) run r's fit
SHAPLEY_CURVES = "dvclive/shapley/plots/metrics"


def metrics(stage: str) -> str:
    return f"metrics/{'eval' if stage == 'evaluate' else stage}.json"


def write_metrics(stage: str, values: dict, headline: dict | None = None, device: str | None = None) -> None:
    """A stage's metrics file (atomic), with the environment that produced it (shed.env.describe) under "env".

    `headline`: numbers for `dvc exp show` under top-level names no other metrics file uses (shapley_s:
    "seconds" is in two files, so DVC would prefix it with the file), next to the already unique
    finetuned.<task>.acc and jobs. They live in the stage's own file, an output, so a stage restored
    from DVC's run cache restores them too (a shared summary file would go stale).
    """
    write_json(metrics(stage), {**values, **(headline or {}), "env": env.describe(device)})


# What each stage reads and writes (metrics aside): dvc.yaml must say the same.
PARAMS = {
    "prepare": ["prepare"],
    "base": ["base", "shapley.model", "finetune.model"],  # built only when one of the models is models/base
    "embed": ["embed"],
    "cluster": ["cluster"],
    # dev questions are embedded like the records (shapley.dev_neighbours)
    "shapley": ["shapley", "train", "embed.model", "embed.fields", "embed.max_seq_length"],
    # perplexity scores the pool with the value model, prompted and cut as the recipe trains
    "sample": ["sample", "shapley.model", "shapley.device", "shapley.dtype", "shapley.chunk_tokens",
               "shapley.shard_records", "train.template",
               "train.max_length", "train.batch_size", "train.micro_batch_size"],
    "finetune": ["finetune", "train"],
    "evaluate": ["evaluate", "finetune.model", "finetune.device", "finetune.dtype", "train.template"],
}
INPUTS = {
    "prepare": [],
    "base": [],
    "embed": [POOL],
    "cluster": [EMBED],
    "shapley": [POOL, DEV, EMBED, CLUSTERS, BASE_MODEL],
    "sample": [POOL, ROWS, DEV, CLUSTERS, SCORES, RECORD_SCORES, BASE_MODEL],
    "finetune": [CURATED_RECORDS, POOL, BASE_MODEL],
    "evaluate": [DEV, EVAL, POOL, FINETUNED, BASE_MODEL],
}
OUTPUTS = {
    "prepare": [PREPARED],
    "base": [BASE_MODEL],
    "embed": [EMBED],
    "cluster": [CLUSTERS, CLUSTERS_PNG],
    "shapley": [SHAPLEY, JOBS_DIR, SHAPLEY_PNG, CONVERGENCE_PNG, SCORES_PLOT, SHAPLEY_CURVES],
    "sample": [CURATED],
    "finetune": [FINETUNED, FINETUNE_CURVE],
    "evaluate": [],
}


def read_pool() -> list[dict]:
    return read_jsonl(POOL)


def read_dev() -> list[dict]:
    return read_jsonl(DEV)


def read_eval() -> list[dict]:
    return read_jsonl(EVAL)


def write_prepared(tables: dict[str, Iterable]) -> None:
    """data/prepared as one directory, all or nothing: tables["pool"]'s (record, origin) pairs as pool.jsonl and
    rows.jsonl side by side in one pass (a streamed pool is read here, chunk by chunk), then dev, eval (and truth,
    for the embedded pool). An origin `{id, source, at, row}` keeps the row's fields in their own order."""
    with atomic_path(PREPARED) as tmp:
        tmp.mkdir()
        for name, rows in tables.items():
            if name != "pool":
                write_jsonl(tmp / f"{name}.jsonl", rows)
                continue
            with (tmp / Path(POOL).name).open("w", encoding="utf-8") as pool, \
                    (tmp / Path(ROWS).name).open("w", encoding="utf-8") as origins:
                for record, origin in rows:
                    pool.write(json_line(record) + "\n")
                    origins.write(row_line(origin) + "\n")


def read_embeddings(mmap: bool = False) -> tuple[np.ndarray, list[str]]:
    """(vectors, record ids): row i is the record with id ids[i]."""
    for path in (EMBEDDINGS, EMBED_IDS):
        if not Path(path).is_file():
            raise ShedError(f"{path}: file not found (run `shed embed` or `dvc repro`)")
    vectors = np.load(EMBEDDINGS, mmap_mode="r" if mmap else None)
    return vectors, Path(EMBED_IDS).read_text(encoding="utf-8").split()


def write_embeddings(vectors: np.ndarray, ids: list[str]) -> None:
    with atomic_path(EMBED) as tmp:
        tmp.mkdir()
        np.save(tmp / Path(EMBEDDINGS).name, vectors)
        (tmp / Path(EMBED_IDS).name).write_text("".join(i + "\n" for i in ids), encoding="utf-8")


def commit_embeddings(partial: str | Path, ids: list[str]) -> None:
    """A finished chunked run's embeddings.npy (written in place, memory-mapped) and the ids as EMBED, all
    or nothing; the partial directory goes."""
    partial = Path(partial)
    with atomic_path(EMBED) as tmp:
        tmp.mkdir()
        (partial / Path(EMBEDDINGS).name).rename(tmp / Path(EMBEDDINGS).name)
        (tmp / Path(EMBED_IDS).name).write_text("".join(i + "\n" for i in ids), encoding="utf-8")
    shutil.rmtree(partial, ignore_errors=True)


def _cluster_file(path: str) -> str:
    if not Path(path).is_file():
        raise ShedError(f"{path}: file not found (run `shed cluster` or `dvc repro`)")
    return path


def read_clusters() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(assignments, proxies)."""
    return (pd.read_csv(_cluster_file(ASSIGNMENTS), dtype={"id": str}),
            pd.read_csv(_cluster_file(PROXIES), dtype={"proxy_id": str}))


def read_duplicates() -> pd.DataFrame:
    """The near-duplicates (id, kept_id, similarity); no rows when cluster.dedup_threshold is 0."""
    return pd.read_csv(_cluster_file(DUPLICATES), dtype={"id": str, "kept_id": str})


def write_clusters(assignments: pd.DataFrame, proxies: pd.DataFrame, duplicates: pd.DataFrame) -> None:
    with atomic_path(CLUSTERS) as tmp:
        tmp.mkdir()
        write_csv(tmp / Path(ASSIGNMENTS).name, assignments)
        write_csv(tmp / Path(PROXIES).name, proxies)
        write_csv(tmp / Path(DUPLICATES).name, duplicates)


def read_scores() -> pd.DataFrame:
    if not Path(SCORES).is_file():
        raise ShedError(f"{SCORES}: file not found (run `shed shapley` or `dvc repro`)")
    return pd.read_csv(SCORES, dtype={"proxy_id": str})


def write_scores(scores: pd.DataFrame, record_scores: pd.DataFrame, subsets: list[dict]) -> None:
    """The shapley stage's data/shapley, whole or not at all: cluster scores, the valued records' own scores
    (the proxies, or every pool record with shapley.players records) and the valuation's subsets or runs."""
    with atomic_path(SHAPLEY) as tmp:
        tmp.mkdir()
        write_csv(tmp / Path(SCORES).name, scores)
        write_csv(tmp / Path(RECORD_SCORES).name, record_scores)
        write_jsonl(tmp / Path(SUBSETS).name, subsets)


def read_record_scores() -> pd.DataFrame:
    if not Path(RECORD_SCORES).is_file():
        raise ShedError(f"{RECORD_SCORES}: file not found (rerun `shed shapley` or `dvc repro`)")
    return pd.read_csv(RECORD_SCORES, dtype={"id": str})


def _by_id(path: str, ids: Iterable[str], rerun: str) -> dict[str, dict]:
    """The objects of a JSONL file whose "id" is one of `ids`, by id. The file is streamed and only those lines are
    parsed: both writers (json_line, sorted keys; row_line, an origin) put the id first. A missing id is an error."""
    wanted = set(ids)
    found: dict[str, dict] = {}
    if not Path(path).is_file():
        raise ShedError(f"{path}: file not found (run `{rerun}` or `dvc repro`)")
    with Path(path).open(encoding="utf-8", newline="\n") as fh:
        for lineno, line in enumerate(fh, start=1):
            head = line[7:line.find('"', 7)] if line.startswith('{"id":"') else None
            if head is None or head in wanted:
                row = jsonl_row(path, lineno, line)
                if row is not None and row.get("id") in wanted:
                    found[row["id"]] = row
    missing = [i for i in wanted if i not in found]
    if missing:
        raise ShedError(f"{path}: no line for record {sorted(missing)[0]} ({len(missing)} of {len(wanted)} missing); "
                        f"rerun `{rerun}` or `dvc repro`")
    return found


def read_rows(ids: Iterable[str]) -> dict[str, dict]:
    """The origins `{id, source, at, row}` of the pool records `ids` (data/prepared/rows.jsonl), by id."""
    return _by_id(ROWS, ids, "shed prepare")


def read_curated_ids() -> list[str]:
    """The curated records' ids, in selection order."""
    if not Path(CURATED_RECORDS).is_file():
        raise ShedError(f"{CURATED_RECORDS}: file not found (run `shed sample` or `dvc repro`)")
    return [r["id"] for r in read_jsonl(CURATED_RECORDS)]


def read_curated() -> list[dict]:
    """The curated records as shed normalised them (`{id, instruction, input, output}`), in selection order: the
    ids of data/curated/records.jsonl joined with data/prepared/pool.jsonl (dataset.jsonl holds the user's rows)."""
    ids = read_curated_ids()
    by_id = _by_id(POOL, ids, "shed prepare")
    return [by_id[i] for i in ids]


def write_curated(origins: list[dict], manifest: dict) -> str:
    """data/curated, whole or not at all, from the chosen records' origins `{id, source, at, row}` in selection
    order: dataset.jsonl (each row as the user gave it), records.jsonl (`{id, source, at}`, line for line) and
    the manifest with the dataset's sha256 added; returns the sha256."""
    with atomic_path(CURATED) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / Path(DATASET).name, (o["row"] for o in origins), line=row_line)
        write_jsonl(tmp / Path(CURATED_RECORDS).name, ({k: o[k] for k in ("id", "source", "at")} for o in origins),
                    line=row_line)
        digest = hashlib.sha256((tmp / Path(DATASET).name).read_bytes()).hexdigest()
        write_json(tmp / Path(MANIFEST).name, {**manifest, "sha256": digest})
    return digest
