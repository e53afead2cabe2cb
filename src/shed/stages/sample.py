"""sample: clusters and their Shapley scores -> the curated dataset, data/curated/dataset.jsonl.

    shed sample                        # params.yaml: sample.*
    # sample.method: qocs | qwcs | random | dsir | full | cluster_uniform | length | perplexity | ifd
    # sample.subset_size: 0.1 (fraction) or 5000 (records)
    # sample.within: nearest | value | loss | ifd | relevance | blend   (which members a cluster gives: qocs, qwcs)
    # sample.blend: [value, loss]   (within blend: the signals it weighs alike; relevance too)
    # sample.cluster_score: value | members   (what ranks the clusters: Shapley values, or their members by within)

Baselines: dsir resamples the pool toward the dev questions' n-gram distribution (shed.dsir);
cluster_uniform weights every cluster equally; length takes the longest responses; perplexity takes
the responses of lowest loss under shapley.model, prompted with train.template; ifd the highest
instruction-following difficulty below 1 (Superfiltering) under the same model (shed.sampling), at most
shapley.chunk_tokens padded tokens a forward pass, in shards of shapley.shard_records records spread over
shapley.workers workers (shapley.executor; shed.shards: the same losses at any worker count), after a memory
estimate (shed.memory) that refuses in one line, before a model loads, what would not fit.
With qocs and qwcs the cluster scores decide how many records each cluster gives and sample.within
which: nearest the centroid (the paper's QOCS; QWCS draws uniformly), the highest record value
(data/shapley/record_scores.csv, shapley.players records), the lowest loss, IFD's order, the highest relevance
(`sampling.relevance`: the response's loss alone minus given its instruction; one more forward pass, the response
alone, as IFD's), or blend (the mean percentile rank by sample.blend's signals). sample.cluster_score members
ranks the clusters by that same signal instead of their Shapley values: one minus their members' mean percentile
rank (`sampling.member_scores`), so one signal decides both which clusters give records and which members.

Near-duplicates (data/clusters/duplicates.csv, cluster.dedup_threshold) leave the pool before any sampler
sees it, `full` included: every method draws from the records left, and subset_size is a fraction of those.

Outputs (data/curated/), in selection order: dataset.jsonl (each chosen record's original row exactly as
the user gave it, every field and its order, from data/prepared/rows.jsonl), records.jsonl (`{id, source, at}`
line for line: the record's shed id and where its row was, e.g. "line 42" of prepare.pool) and manifest.json
(method, size, pool_size: the records left after near-duplicates, duplicates_removed, seed, sha256 of
dataset.jsonl, per-cluster counts). The per-record map is its own JSON Lines file, not a manifest list, because
sample.method full over a 1M-record pool would make the manifest a 1M-entry JSON document read whole. The
normalised records `{id, instruction, input, output}` (and `messages`) that finetune trains on are
records.jsonl's ids joined with data/prepared/pool.jsonl (`artifacts.read_curated`); `shed export` writes them
in the layouts LLaMA-Factory, axolotl and TRL read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shed import artifacts, dsir, memory, sampling
from shed.clustering import members_by_distance
from shed.config import Params
from shed.fileio import ShedError
from shed.records import question_as_record, record_text, responses

log = logging.getLogger(__name__)


def cluster_members(assignments: pd.DataFrame) -> dict[int, list[str]]:
    """Each cluster's record ids, nearest the centroid first."""
    rows = members_by_distance(assignments["cluster"].to_numpy(), assignments["distance"].to_numpy())
    id_of = assignments["id"].to_numpy()
    return {c: id_of[r].tolist() for c, r in rows.items()}


@dataclass
class Inputs:
    """What the samplers read besides the config: the pool, its clusters and scores, and per-record signals
    (each in pool order, computed only when the chosen method or sample.within reads it)."""

    pool: list[dict]  # without the near-duplicates
    assignments: pd.DataFrame  # of those records
    scores: pd.DataFrame
    duplicates: int = 0  # near-duplicates left out of the pool
    dev: list[dict] | None = None  # dsir's target
    losses: list[float] | None = None  # perplexity, within loss: the response's loss under shapley.model
    ifd: list[float] | None = None  # ifd, within ifd: `losses.ifd`
    relevance: list[float] | None = None  # within relevance (or blend with it): `sampling.relevance`
    record_scores: dict[str, float] | None = None  # within value: data/shapley/record_scores.csv

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.pool]


SIGNAL_NAMES = {"losses": "loss", "ifd": "IFD", "relevance": "relevance"}


def _signal(inputs: Inputs, name: str) -> list[float]:
    values = getattr(inputs, name)
    if values is None or len(values) != len(inputs.pool):
        raise ValueError(f"sample: the samplers need one {SIGNAL_NAMES[name]} per pool record")
    return values


def signal_keys(signal: str, inputs: Inputs) -> list[float]:
    """Sort keys (ascending = taken first), in pool order, of one record signal: value (highest record score
    first), loss (lowest first), relevance (highest first) or ifd (Superfiltering's order)."""
    if signal == "value":
        missing = [i for i in inputs.ids if i not in (inputs.record_scores or {})]
        if missing:
            raise ShedError(f"{artifacts.RECORD_SCORES}: record {missing[0]} has no score: sample.within value needs "
                            "every record valued (shapley.players records)")
        return [-inputs.record_scores[i] for i in inputs.ids]
    if signal == "loss":
        return list(_signal(inputs, "losses"))
    if signal == "relevance":
        return [-v for v in _signal(inputs, "relevance")]
    return sampling.ifd_keys(_signal(inputs, "ifd"))


def within_keys(cfg, inputs: Inputs) -> dict[str, float] | None:
    """Sort keys (ascending = taken first) of sample.within's record signal (cfg: the sample block); None for
    nearest."""
    if cfg.within == "nearest":
        return None
    if cfg.within == "blend":
        return dict(zip(inputs.ids, sampling.blend_keys(*(signal_keys(s, inputs) for s in cfg.blend))))
    return dict(zip(inputs.ids, signal_keys(cfg.within, inputs)))


def _scored_clusters(cfg, inputs: Inputs) -> tuple[dict[int, float], dict[int, list[str]]]:
    """(each cluster's score, by sample.cluster_score; its members in sample.within's order)."""
    members = cluster_members(inputs.assignments)
    scores = {int(c): float(s) for c, s in zip(inputs.scores["cluster"], inputs.scores["score"])}
    if set(scores) != set(members):
        raise ShedError(f"{artifacts.SCORES}: scores cover {len(scores)} clusters but the clustering has "
                        f"{len(members)} (rerun shapley)")
    keys = within_keys(cfg, inputs)
    if cfg.cluster_score == "members":
        scores = sampling.member_scores(members, keys)
    return scores, members if keys is None else sampling.order_within(members, keys)


def _dsir(cfg, inputs: Inputs, size: int) -> list[str]:
    weights = dsir.log_importance_weights([record_text(r) for r in inputs.pool],
                                          [record_text(question_as_record(q)) for q in inputs.dev or []])
    return sampling.dsir_sample(inputs.ids, weights, size, cfg.seed)


def _qocs(cfg, inputs: Inputs, size: int) -> list[str]:
    return sampling.qocs(*_scored_clusters(cfg, inputs), size)


def _qwcs(cfg, inputs: Inputs, size: int) -> list[str]:
    scores, members = _scored_clusters(cfg, inputs)
    return sampling.qwcs(scores, members, size, cfg.temperature, cfg.seed, ordered=cfg.within != "nearest")


def _qfcs(cfg, inputs: Inputs, size: int) -> list[str]:
    members = cluster_members(inputs.assignments)  # nearest first: the draw's order, whatever sample.within is
    scores, _ = _scored_clusters(cfg, inputs)
    return sampling.qfcs(scores, members, size, cfg.exclude, cfg.seed, key_of=within_keys(cfg, inputs))


# sample.method -> sampler(cfg, inputs, size) -> record ids in selection order; each choice of the config has one.
SAMPLERS = {
    "qocs": _qocs,
    "qwcs": _qwcs,
    "qfcs": _qfcs,
    "random": lambda cfg, inputs, size: sampling.random_sample(inputs.ids, size, cfg.seed),
    "dsir": _dsir,
    "full": lambda cfg, inputs, size: inputs.ids,
    "cluster_uniform": lambda cfg, inputs, size: sampling.cluster_uniform(cluster_members(inputs.assignments), size,
                                                                          cfg.seed),
    "length": lambda cfg, inputs, size: sampling.longest_output(
        inputs.ids, [sum(map(len, responses(r))) for r in inputs.pool], size),
    "perplexity": lambda cfg, inputs, size: sampling.lowest_loss(inputs.ids, _signal(inputs, "losses"), size),
    "ifd": lambda cfg, inputs, size: sampling.highest_ifd(inputs.ids, _signal(inputs, "ifd"), size),
}


def select(params: Params, inputs: Inputs) -> list[str]:
    """Record ids chosen by sample.method (pure: no I/O)."""
    cfg = params.sample
    return SAMPLERS[cfg.method](cfg, inputs, sampling.resolve_size(cfg.subset_size, len(inputs.pool)))


SCORED = ("qocs", "qwcs", "qfcs")  # the samplers that read the cluster scores, and sample.within
# a record signal -> the inputs it is computed from
SIGNAL_NEEDS = {"value": {"record_scores"}, "loss": {"losses"}, "ifd": {"losses", "ifd"},
                "relevance": {"losses", "relevance"}}


def needs(cfg) -> set[str]:
    """The per-record signals sample.method and sample.within read: losses, ifd, relevance, record_scores, dev."""
    out: set[str] = set()
    if cfg.method in ("perplexity", "ifd"):
        out |= SIGNAL_NEEDS["loss" if cfg.method == "perplexity" else "ifd"]
    if cfg.method in SCORED and cfg.within != "nearest":
        for signal in cfg.blend if cfg.within == "blend" else [cfg.within]:
            out |= SIGNAL_NEEDS[signal]
    if cfg.method == "dsir":
        out.add("dev")
    return out


# Losses already computed in this process, per record id (a content hash), by everything else that decides them:
# benchmarks run sample many times over pools that share most records.
_LOSSES: dict[str, dict[str, float]] = {}


def record_losses(params: Params, pool: list[dict], kinds: tuple[bool, ...] = (False,)) -> list[list[float]]:
    """`losses.response_losses` of the pool under shapley.model (on shapley.device, in shapley.dtype), with the
    recipe's template and max_length, train.micro_batch records and at most shapley.chunk_tokens padded tokens
    per forward pass (what fits a training step fits here, with no gradients): one list per kind, False each
    response given its prompt, True each response alone (IFD's denominator). Shards of shapley.shard_records
    records go to shapley.workers workers (shapley.executor; `shed.shards`: the same losses at any worker count),
    every kind in one pass. The peak memory is estimated before a model loads (`shed.memory`)."""
    from tqdm import tqdm

    from shed import shards
    from shed.executors import workers_on_device
    from shed.models import load_tokenizer, resolve_device
    from shed.training import longest_encoding

    cfg = params.shapley
    known = {kind: _LOSSES.setdefault(json.dumps([cfg.model, cfg.device, cfg.dtype, params.train.template,
                                                   params.train.max_length, params.train.micro_batch,
                                                   cfg.chunk_tokens, cfg.shard_records, kind]), {})
             for kind in kinds}
    missing = {kind: [r for r in pool if r["id"] not in known[kind]] for kind in kinds}
    tasks = [task for kind in kinds for task in shards.tasks({None: missing[kind]}, cfg.shard_records, kind)]
    if tasks:
        device, shape = resolve_device(cfg.device), memory.read_shape(cfg.model)
        limit = params.train.max_length or (shape.max_positions if shape else 0) or 0
        if cfg.executor == "ray":
            log.info("sample: Ray actors run where Ray places them: peak memory not checked here")
        else:
            records = [r for kind in kinds for r in missing[kind]]
            copies = workers_on_device(device, cfg.workers)
            memory.check("sample", cfg.model, shape, device,
                         lambda n: memory.scoring_estimate(params, shape, device, n, copies), limit,
                         lambda: longest_encoding(records, load_tokenizer(cfg.model), params.train.template, limit))
        spec = shards.ScoreSpec(cfg.model, cfg.device, cfg.dtype, params.train, params.train.micro_batch,
                                cfg.chunk_tokens)
        cut = dict.fromkeys(kinds, 0)
        with tqdm(total=sum(len(t["records"]) for t in tasks), desc="record losses", unit="record") as bar:
            for result in shards.score(spec, tasks, cfg.workers, cfg.executor, bar, max_retries=cfg.max_retries):
                known[result["unconditional"]].update(zip(result["ids"], result["losses"]))
                cut[result["unconditional"]] += sum(loss == float("inf") for loss in result["losses"])
                limit = result["max_length"]
        for kind, count in cut.items():
            if count:
                log.warning("%s: %d records keep no response token within %d tokens (train.max_length); they "
                            "rank last", "response alone" if kind else "perplexity", count, limit)
    return [[known[kind][r["id"]] for r in pool] for kind in kinds]


def read_inputs(params: Params) -> Inputs:
    """The pool, clusters, scores and whatever per-record signal sample.method and sample.within read."""
    want = needs(params.sample)
    assignments, _ = artifacts.read_clusters()
    duplicates = set(artifacts.read_duplicates()["id"])
    inputs = Inputs([r for r in artifacts.read_pool() if r["id"] not in duplicates],
                    assignments[~assignments["id"].isin(duplicates)].reset_index(drop=True), artifacts.read_scores(),
                    duplicates=len(duplicates))
    inputs.dev = artifacts.read_dev() if "dev" in want else None
    table = artifacts.read_record_scores() if "record_scores" in want or (
        "losses" in want and Path(artifacts.RECORD_SCORES).is_file()) else None
    kinds = []  # the losses to compute: each response given its prompt (False), alone (True, IFD's denominator)
    if "losses" in want:
        # The forward valuation's base losses are this very signal (same model, template and cut): reuse them.
        known = {} if table is None else dict(zip(table["id"].astype(str), table["loss"].astype(float)))
        if all(r["id"] in known and not np.isnan(known[r["id"]]) for r in inputs.pool):  # inf: cut, still a loss
            log.info("losses of the %d pool records from %s (the forward valuation's base losses)", len(inputs.pool),
                     artifacts.RECORD_SCORES)
            inputs.losses = [known[r["id"]] for r in inputs.pool]
        else:
            kinds.append(False)
    if want & {"ifd", "relevance"}:
        kinds.append(True)
    scored = dict(zip(kinds, record_losses(params, inputs.pool, tuple(kinds)))) if kinds else {}
    inputs.losses = scored.get(False, inputs.losses)
    if "ifd" in want:
        from shed.losses import ifd

        inputs.ifd = ifd(inputs.losses, scored[True])
    if "relevance" in want:
        inputs.relevance = sampling.relevance(inputs.losses, scored[True])
    if "record_scores" in want:
        inputs.record_scores = dict(zip(table["id"].astype(str), table["score"].astype(float)))
    return inputs


def main(params: Params) -> None:
    cfg = params.sample
    inputs = read_inputs(params)
    pool, assignments = inputs.pool, inputs.assignments
    chosen = select(params, inputs)
    origins = artifacts.read_rows(chosen)
    dataset = [origins[i] for i in chosen]
    cluster_of = dict(zip(assignments["id"], assignments["cluster"].astype(int)))
    counts = pd.Series([cluster_of[i] for i in chosen]).value_counts().sort_index()
    digest = artifacts.write_curated(dataset, {
        "method": cfg.method, "within": cfg.within if cfg.method in SCORED else None,
        "blend": cfg.blend if cfg.method in SCORED and cfg.within == "blend" else None,
        "cluster_score": cfg.cluster_score if cfg.method in SCORED else None,
        "size": len(dataset), "pool_size": len(pool), "fraction": len(dataset) / len(pool),
        "temperature": cfg.temperature if cfg.method == "qwcs" else None, "seed": cfg.seed,
        "duplicates_removed": inputs.duplicates, "clusters": {str(k): int(v) for k, v in counts.items()},
    })
    artifacts.write_metrics("sample", {"method": cfg.method, "within": cfg.within, "cluster_score": cfg.cluster_score,
                                       "size": len(dataset),
                                       "fraction": round(len(dataset) / len(pool), 6),
                                       "clusters_used": int(len(counts)), "duplicates_removed": inputs.duplicates})
    log.info("%s: %d of %d records from %d clusters -> %s (sha256 %s)", cfg.method, len(dataset), len(pool),
             len(counts), artifacts.DATASET, digest[:12])
