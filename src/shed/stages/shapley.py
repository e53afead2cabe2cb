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

With shapley.method = inrun nothing is retrained (shed.inrun, docs/engine.md; run by shed.inrun_runner, which
loads the model once): each of shapley.k runs fine-tunes one adapter on all the proxies with the train recipe
(seed train.seed + run: its own adapter init and data order), and before every update credits each proxy in the
batch with η_t·c_t·⟨∇ℓ(proxy), ∇ℓ(q)⟩ per dev question q (the first-order drop of q's loss it causes; η_t the
step's learning rate, c_t its clipping coefficient; with shapley.direction adam the proxy's gradient first goes
through Adam's preconditioner). score = mean over runs of the summed credits (token-weighted over the dev set as
gold_loglik weighs it, or over the proxy's dev_neighbours), stderr over runs. One training pass per step: the
credit pass's per-example gradients sum to the step's gradient, which the trainer applies. shapley.dev_every
N > 1 takes the dev questions' gradients every N steps only and reuses them in between (held in memory). Each
finished run is saved at once (data/shapley_jobs/inrun/<context>/run-NNNN.*, shed.runstore), and the run in
progress every shapley.checkpoint_seconds (run-NNNN.partial.*: adapter, optimizer, scheduler, RNG, credits so
far), so a rerun after a crash, or with a larger k, redoes only the runs not finished and resumes the
interrupted one at its last checkpoint, ending with the same scores.csv bytes.

With shapley.players records (methods inrun and forward) every pool record is valued and a cluster's score is
shapley.aggregate of its members'. shapley.method forward (shed.forward, run by shed.forward_runner) scores a
record by its loss under the model minus its loss after a short fit on the dev set, losses kept per record in
data/shapley_jobs/forward (shed.runstore) so that a killed or grown run scores only what is missing
(docs/engine.md#every-record-valued-shapleyplayers-records). Its losses are taken in shards of
shapley.shard_records records (shed.shards), on shapley.workers workers like retraining's jobs, with the same
scores at any worker count; each finished shard is kept at once.

Memory (docs/engine.md#memory). A dev item is cut at shapley.dev_max_length tokens (0: the model's own limit;
forward: at most train.max_length), logged, and counted in metrics/shapley.json (dev_max_length, dev_truncated,
dev_tokens_cut, dev_tokens_max); dev passes and record losses take at most shapley.chunk_tokens padded tokens a
pass. Before the model loads the method's peak is estimated from the model's config.json and safetensors
headers (shed.memory), logged (memory_estimate_gb) and, when it exceeds the memory available, refused in one
line naming the settings to lower, before anything is written.

Outputs: data/shapley/scores.csv `cluster, proxy_id, size, score, stderr, credits`,
data/shapley/record_scores.csv `id, cluster, score, stderr, tokens, loss` (each valued record's own score),
data/shapley/subsets.jsonl (retrain: each evaluated subset and its value; inrun: one line per run,
its seed, steps, dev log-likelihood before and after and the credits' first-order prediction of the
change), metrics/shapley.json, plots/shapley_scores.csv, plots/shapley.png, plots/convergence.png, and
the valuation's curves with dvclive in dvclive/shapley/plots/metrics (retrain: each job's dev value and
subset size in the estimator's order, written at the end; inrun: each run's training loss `run-<r>/loss` per
step; forward: the same of each run's dev fit, and its dev loss before (step 0) and after (1) it,
`run-<r>/dev_loss`): `dvc plots show`. inrun's and forward's loss rows are written as each optimizer step
happens (`curves.live_steps`), so the curves can be watched while the stage runs; a run kept from an earlier
stage run, or resumed from its mid-run checkpoint, has its earlier steps' rows written at once from what was
kept, so every curve ends complete.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from shed import artifacts, curves, memory, plots
from shed.config import Params
from shed.embedding import embed_texts
from shed.executors import JobSpec, run_jobs, workers_on_device
from shed.fileio import ShedError, write_csv
from shed.forward_runner import ForwardRunner
from shed.inrun_runner import InRunRunner
from shed.jobstore import JobStore, job_context, subset_key
from shed.records import question_as_record, record_text
from shed.runstore import (
    ForwardStore,
    RunCheckpoint,
    RunStore,
    forward_context,
    inrun_context,
)
from shed.scoring import dev_kind
from shed.shapley import ESTIMATORS, ShapleyResult, local_values, schedule

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


def run_and_record(spec: JobSpec, jobs: list[dict], store: JobStore, workers: int, executor: str,
                   max_retries: int = 2) -> dict:
    """Run `jobs`, storing each result the moment it arrives; returns timing totals."""
    stats = {"jobs_run": len(jobs), "train": 0.0, "score": 0.0, "job": 0.0, "record": 0.0, "setup": 0.0,
             "wall": 0.0}
    if not jobs:
        return stats
    log.info("running %d new jobs (%s executor, %d worker(s))", len(jobs), executor, workers)
    start = time.perf_counter()
    with tqdm(total=len(jobs), desc="shapley jobs", unit="job") as bar:
        for result in run_jobs(spec, jobs, workers, executor, max_retries):
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
    """Row i: the indices of the shapley.dev_neighbours dev items nearest proxy i (cosine, in the embed
    stage's space; a question embedded as the record that teaches its correct choice, an instruction
    record as itself: its embed.fields, as the pool's records are embedded)."""
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


# --- method inrun -----------------------------------------------------------------------------------

def run_curve(live, run: int) -> curves.StepCurve:
    """Run `run`'s training-loss curve (`run-<r>/loss`, one row per optimizer step) in `live`."""
    return curves.StepCurve(live, f"run-{run}/", lr=False)


def run_summary(summary, weights: np.ndarray) -> dict:
    """A finished run in JSON: the dev log-likelihood (as gold_loglik scores the whole dev set) before
    and after it, and the credits' first-order prediction of the change (their token-weighted sum)."""
    return {"run": summary.run, "seed": summary.seed, "steps": summary.steps, "train_loss": summary.train_loss,
            "v_before": float(-(weights @ summary.dev_before)), "v_after": float(-(weights @ summary.dev_after)),
            "first_order": float(weights @ summary.first_order), "losses": [round(x, 6) for x in summary.losses],
            "seconds": round(summary.seconds, 2), "seconds_credits": round(summary.credit_seconds, 2)}


def kept_runs(store: RunStore, players: list[int], n_dev: int, k: int):
    """(credits of k runs holding the store's finished ones, their summaries by run)."""
    from shed.inrun import InRunCredits

    credits, summaries = InRunCredits(players, n_dev, k), {}
    for run in range(k):
        found = store.load(run, players, n_dev)
        if found is not None:
            credits.put_run(run, found[0])
            summaries[run] = found[1]
            store.drop_partial(run)  # left by a kill between saving the run and dropping its checkpoint
    return credits, summaries


def run_and_save(runner: InRunRunner, store: RunStore, todo: list[int], credits, summaries: dict[int, dict],
                 checkpoint_seconds: float) -> tuple[list, float]:
    """Run the runs `todo`, each saved to `store` (and put in `credits`, `summaries`) the moment it finishes, and
    write every run's loss curve (kept runs' at once); returns (the new runs' summaries, wall seconds)."""
    start, done = time.perf_counter(), []
    with curves.live_steps(artifacts.SHAPLEY_CURVES) as live, \
            tqdm(total=len(todo) * runner.steps, desc="in-run credits", unit="step", disable=not todo) as bar:
        for run in sorted(summaries):  # kept runs' curves at once (runs saved before curves have none)
            run_curve(live, run).resumed(summaries[run].get("losses", []))
        for summary, one in runner.run(todo, progress=bar, curves=lambda run: run_curve(live, run),
                                       checkpoints=lambda run: RunCheckpoint(store, run, checkpoint_seconds)):
            summaries[summary.run] = run_summary(summary, runner.weights)
            store.save(summary.run, one, summaries[summary.run])
            store.drop_partial(summary.run)
            credits.put_run(summary.run, one)
            done.append(summary)
    return done, time.perf_counter() - start


def inrun_metrics(cfg, runner: InRunRunner, lines: list[dict], done: list, wall: float) -> dict:
    """metrics/shapley.json's in-run part: runs kept and run, the dev value before and after, timings."""
    steps_run = sum(s.steps - s.resumed_from for s in done)
    change = np.mean([s["v_after"] - s["v_before"] for s in lines])
    first_order = float(np.mean([s["first_order"] for s in lines]))
    return {
        "runs": cfg.k, "runs_reused": cfg.k - len(done), "runs_run": len(done), "steps": runner.steps,
        "steps_run": steps_run,
        "resumed": [{"run": s.run, "from_step": s.resumed_from} for s in done if s.resumed_from],
        "direction": cfg.direction, "dev_every": cfg.dev_every, "normalize": cfg.normalize, "warmup": cfg.warmup,
        "device": runner.device, "dtype": cfg.dtype,
        "v_empty": lines[0]["v_before"], "v_full": float(np.mean([s["v_after"] for s in lines])),
        "first_order": first_order,
        # Efficiency: the credits' sum over the measured change of the dev value (1: they account for all of it;
        # only the raw first-order credits, normalize none, are meant to add up).
        "efficiency": round(float(first_order / change), 4) if cfg.normalize == "none" and change else None,
        "seconds_setup": round(runner.setup_seconds, 2), "seconds_train": round(wall, 1),
        "seconds_credits": round(sum(s.credit_seconds for s in done), 1),
        "seconds_per_step": round(wall / steps_run, 4) if steps_run else None,
    }


def value_inrun(params: Params, dev: list[dict], players: list[int], proxy_records: dict[int, dict],
                near: np.ndarray | None, dev_cap: int | None):
    """(result, subsets.jsonl lines, metrics) of the in-run method, dev items cut at `dev_cap` tokens."""
    cfg = params.shapley
    if cfg.workers > 1 or cfg.executor != "local":
        log.info("method inrun runs in this process: shapley.workers and shapley.executor are not used")
    records = [proxy_records[c] for c in players]
    runner = InRunRunner(cfg, params.train, dev, dev_cap, records, players)
    store = RunStore(artifacts.INRUN_RUNS, inrun_context(params, [q["id"] for q in dev], players,
                                                         [r["id"] for r in records], runner.device))
    credits, summaries = kept_runs(store, players, len(dev), cfg.k)
    todo = [run for run in range(cfg.k) if run not in summaries]
    log.info("in-run Shapley: %d proxies, %d dev questions, k=%d runs of %d steps (%d finished before, %d to run)",
             len(players), len(dev), cfg.k, runner.steps, cfg.k - len(todo), len(todo))
    done, wall = run_and_save(runner, store, todo, credits, summaries, cfg.checkpoint_seconds)
    if near is not None:
        log.info("each proxy valued on its %d nearest dev questions (of %d)", cfg.dev_neighbours, len(dev))
        result = local_values(credits.vector_result(), dict(zip(players, near)))
    else:
        result = credits.result(runner.weights)
    lines = [{k: v for k, v in summaries[r].items() if not k.startswith("seconds") and k != "losses"}
             for r in range(cfg.k)]
    return result, lines, inrun_metrics(cfg, runner, lines, done, wall), None


# --- method forward: two forward passes per player around a fit on the dev set ----------------------

def forward_result(players: list[int], base: np.ndarray, tuned: np.ndarray) -> ShapleyResult:
    """Each player's score (mean over runs of its base minus tuned loss), stderr, one credit per run, and the
    running scores after each run (none for one run)."""
    from shed import forward

    mean, stderr = forward.scores(base, tuned)
    diffs = forward.differences(base, tuned)
    return ShapleyResult(values=dict(zip(players, mean.tolist())), stderr=dict(zip(players, stderr.tolist())),
                         credits={p: diffs[:, i].tolist() for i, p in enumerate(players)},
                         estimates=[dict(zip(players, np.nanmean(diffs[: r + 1], 0).tolist()))
                                    for r in range(len(diffs))] if len(diffs) > 1 else [])


def value_forward(params: Params, dev: list[dict], players: list[int], player_records: dict[int, dict],
                  near: np.ndarray | None, dev_cap: int | None):
    """(result, subsets.jsonl lines, metrics, base losses) of the forward method, dev records cut at `dev_cap`
    tokens (at most train.max_length)."""
    cfg = params.shapley
    if near is not None:
        log.info("method forward values against the whole dev set: shapley.dev_neighbours is not used")
    records = [player_records[p] for p in players]
    runner = ForwardRunner(cfg, params.train, dev, dev_cap)
    store = ForwardStore(artifacts.FORWARD_RUNS, forward_context(params, None, runner.device),
                         forward_context(params, [q["id"] for q in dev], runner.device))
    todo = runner.needed(records, store, range(cfg.k))
    log.info("forward valuation: %d players, %d dev records fitted for %d epochs, k=%d runs; %d of %d losses to "
             "compute (the rest kept in %s)", len(records), len(runner.dev_records), runner.recipe.epochs, cfg.k, todo,
             len(records) * (cfg.k + 1), store.dir.parent)
    start = time.perf_counter()
    with curves.live_steps(artifacts.SHAPLEY_CURVES) as live, \
            tqdm(total=todo, desc="forward losses", unit="record", disable=not todo) as bar:
        (_, base), *fits = runner.run(records, range(cfg.k), store, progress=bar,
                                      curves=lambda run: run_curve(live, run))
        wall = time.perf_counter() - start
        for r, _ in fits:  # each run's dev loss before (step 0) and after (step 1) its fit
            for step, loss in enumerate((r.dev_before, r.dev_after)):
                live.step = step
                live.log_metric(f"run-{r.run}/dev_loss", loss)
    summaries = [r for r, _ in fits]
    lines = [{"run": r.run, "seed": r.seed, "dev_loss_before": r.dev_before, "dev_loss_after": r.dev_after,
              "train_loss": r.train_loss} for r in summaries]
    metrics = {"runs": cfg.k, "losses_computed": todo, "dev_epochs": runner.recipe.epochs, "device": runner.device,
               "dtype": cfg.dtype, "v_empty": -summaries[0].dev_before,
               "v_full": float(np.mean([-r.dev_after for r in summaries])),
               "seconds_setup": round(runner.setup_seconds, 2), "seconds_train": round(wall, 1)}
    return forward_result(players, base, np.stack([losses for _, losses in fits])), lines, metrics, base


# --- method retrain ---------------------------------------------------------------------------------

def value_retrain(params: Params, dev: list[dict], players: list[int], proxy_records: dict[int, dict],
                  near: np.ndarray | None, dev_cap: int | None):
    """(result, subsets.jsonl lines, metrics) of the retraining method, dev items cut at `dev_cap` tokens."""
    cfg = params.shapley
    # The estimators fix their subsets before seeing any value: evaluate them all (in parallel
    # where configured), then let the estimator read the recorded values in its own order.
    subsets = schedule(cfg.estimator, players, cfg.k, cfg.n, cfg.seed)
    log.info("Shapley (%s): %d proxies, k=%d, n=%d -> %d distinct fine-tune-and-score jobs",
             cfg.estimator, len(players), cfg.k, cfg.n, len(subsets))
    spec = JobSpec(model=cfg.model, device=cfg.device, dtype=cfg.dtype, train=params.train, value=cfg.value,
                   dev=dev, dev_path=str(Path(artifacts.DEV).resolve()), dev_max_length=dev_cap,
                   chunk_tokens=cfg.chunk_tokens)
    context = job_context(cfg.model, params.train, cfg.value, [q["id"] for q in dev],
                          dev_cut=(cfg.dev_max_length, cfg.chunk_tokens))
    with JobStore(artifacts.JOBS, context) as store:
        jobs = missing_jobs(subsets, proxy_records, store, params.train.seed, need_questions=bool(cfg.dev_neighbours))
        stats = run_and_record(spec, jobs, store, cfg.workers, cfg.executor, cfg.max_retries)
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
    lines = [{"clusters": sorted(int(c) for c in s), "size": len(s), "value": store.values[key(s)]}
             for s in result.evaluations]
    with curves.live_curves(artifacts.SHAPLEY_CURVES) as live:
        for step, line in enumerate(lines):
            live.step = step
            live.log_metric("value", line["value"])
            live.log_metric("size", line["size"])
    run = max(stats["jobs_run"], 1)
    metrics = {
        "estimator": cfg.estimator, "executor": cfg.executor, "workers": cfg.workers,
        "jobs": len(result.evaluations), "jobs_reused": reused, "jobs_run": stats["jobs_run"],
        "v_full": store.values[key(frozenset(players))], "v_empty": store.values[key(frozenset())],
        "seconds_setup": round(stats["setup"], 2),
        "seconds_train": round(stats["train"], 1), "seconds_score": round(stats["score"], 1),
        # Per job, everything but training and scoring: seeding, batching, IPC, recording (fsync).
        "seconds_overhead": round((stats["job"] - stats["train"] - stats["score"] + stats["record"]) / run, 4),
        "jobs_per_minute": round(60 * stats["jobs_run"] / stats["wall"], 1) if stats["jobs_run"] else None,
    }
    return result, lines, metrics, None


def aggregate(values: np.ndarray, how: str) -> tuple[float, float]:
    """(a cluster's score, its stderr) from its members' scores (NaN ignored): mean, median or the 10%-each-side
    trimmed mean, with the members' spread over sqrt(count) as the stderr."""
    from scipy.stats import trim_mean

    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    centre = {"mean": np.mean, "median": np.median, "trimmed": lambda v: trim_mean(v, 0.1)}[how](values)
    spread = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(centre), spread


def length_correlation(scores: np.ndarray, tokens: np.ndarray) -> float | None:
    """Spearman's rank correlation of the valued records' scores with their response tokens (None if undefined):
    near 0 when a score is not a proxy for length."""
    from scipy.stats import spearmanr

    keep = np.isfinite(scores)
    if keep.sum() < 3 or np.ptp(scores[keep]) == 0 or np.ptp(tokens[keep]) == 0:
        return None
    return round(float(spearmanr(scores[keep], tokens[keep]).statistic), 4)


METHODS = {"retrain": value_retrain, "inrun": value_inrun, "forward": value_forward}


def dev_cut(params: Params, tokenizer, dev: list[dict], limit: int | None) -> memory.Cut:
    """How the dev items fare at their cap, logged when it cuts any: shapley.dev_max_length, 0 for the model's
    own `limit` (None: unknown, uncut); method forward fits and scores them as training records, so at most
    train.max_length too. An item's tokens are its scored row (`inrun.dev_rows`: prompt and response, or question
    and answer) or, for forward, its training encoding."""
    from shed import forward, inrun
    from shed.training import encode_record

    cfg, train = params.shapley, params.train
    if cfg.dev_max_length and limit and cfg.dev_max_length > limit:
        raise ShedError(f"params.yaml: shapley.dev_max_length: {cfg.dev_max_length} exceeds the model's own limit of "
                        f"{limit} tokens (max_position_embeddings)")
    cap = cfg.dev_max_length or limit
    if cfg.method == "forward":
        cap = min([n for n in (cap, train.max_length or limit) if n], default=None)
        lengths = [len(encode_record(r, tokenizer, train.template, None)[0]) for r in forward.dev_as_records(dev)]
    else:
        lengths = [len(ids) for ids, _ in inrun.dev_rows(tokenizer, dev, train.template)]
    cut = memory.Cut.of(lengths, cap or 0)
    setting = "shapley.dev_max_length" if cap == (cfg.dev_max_length or limit) else "train.max_length"
    if cut.cut:
        log.warning("shapley: %s", cut.describe(f"dev items ({artifacts.DEV})", setting))
    return cut


def check_memory(params: Params, shape: memory.ModelShape | None, cut: memory.Cut, records: list[dict],
                 tokenizer) -> memory.Estimate | None:
    """The method's estimated peak (`shed.memory.check`), logged; a ShedError naming the settings to lower when it
    exceeds the memory available on shapley.device. Training records are taken at train.max_length (or the
    model's limit), unless that does not fit: then at the longest of `records` as encoded."""
    from shed.models import resolve_device
    from shed.training import longest_encoding

    cfg, train = params.shapley, params.train
    device = resolve_device(cfg.device)
    limit = train.max_length or (shape.max_positions if shape else 0) or 0
    if cfg.method == "inrun":
        def build(n: int) -> memory.Estimate:
            return memory.inrun_estimate(params, shape, device, cut.lengths, n)
    elif cfg.method == "forward":
        # The stage's own copy (the dev fits), and with local workers theirs on the device too; Ray's actors run
        # where Ray places them, unchecked.
        copies = 1 + (workers_on_device(device, cfg.workers) if cfg.workers > 1 and cfg.executor == "local" else 0)

        def build(n: int) -> memory.Estimate:
            return memory.forward_estimate(params, shape, device, cut.tokens_max, n, copies)
    elif cfg.executor == "ray":
        log.info("shapley: Ray actors run where Ray places them: peak memory not checked here")
        return None
    else:
        copies = workers_on_device(device, cfg.workers)  # worker processes on one device

        def build(n: int) -> memory.Estimate:
            return memory.retrain_estimate(params, shape, device, cut.lengths, n, copies)
    return memory.check("shapley", cfg.model, shape, device, build, limit,
                        lambda: longest_encoding(records, tokenizer, train.template, limit))


def main(params: Params) -> None:
    from shed.models import load_tokenizer
    from shed.training import encode_record

    cfg = params.shapley
    start = time.perf_counter()
    dev = artifacts.read_dev()
    problem = cfg.dev_problem(dev_kind(dev))
    if problem:
        raise ShedError(f"params.yaml: shapley.value: {problem}")
    pool_records = artifacts.read_pool()
    pool = {r["id"]: r for r in pool_records}
    assignments, proxies = artifacts.read_clusters()
    missing = [p for p in proxies["proxy_id"] if p not in pool]
    if missing:
        raise ShedError(f"{artifacts.POOL}: proxy record {missing[0]} is not in the pool "
                        "(rerun prepare, embed, cluster)")
    clusters = [int(c) for c in proxies["cluster"]]
    proxy_records = {int(c): pool[p] for c, p in zip(proxies["cluster"], proxies["proxy_id"])}
    cluster_of = dict(zip(assignments["id"].astype(str), assignments["cluster"].astype(int)))
    if cfg.players == "records":  # player i: the pool's record i
        players, player_records = list(range(len(pool_records))), dict(enumerate(pool_records))
    else:
        players, player_records = clusters, proxy_records
    if cfg.method == "retrain" and cfg.n > len(players):
        raise ShedError(f"params.yaml: shapley.n: {cfg.n} is larger than the {len(players)} proxies")
    if cfg.dev_neighbours > len(dev):
        raise ShedError(f"params.yaml: shapley.dev_neighbours: {cfg.dev_neighbours} is more than the {len(dev)} "
                        f"questions in {artifacts.DEV}")
    tokenizer = load_tokenizer(cfg.model)
    shape = memory.read_shape(cfg.model)
    cut = dev_cut(params, tokenizer, dev, shape.max_positions if shape else None)
    valued = [player_records[p] for p in players]
    # Before any model loads: a run that cannot fit stops now, not at an out-of-memory kill mid-run.
    estimate = check_memory(params, shape, cut, valued, tokenizer)
    # Before any fine-tune: a missing embedding or embedding model stops the run now, not after the jobs.
    near = nearest_questions(params, dev, [player_records[p]["id"] for p in players]) \
        if cfg.dev_neighbours and cfg.method != "forward" else None

    result, lines, method_metrics, losses = METHODS[cfg.method](params, dev, players, player_records, near, cut.cap)

    tokens = np.array([sum(label != -100 for label in encode_record(r, tokenizer, params.train.template,
                                                                   params.train.max_length)[1][1:]) for r in valued])
    values = np.array([result.values[p] for p in players], dtype=float)
    records = pd.DataFrame({
        "id": [r["id"] for r in valued], "cluster": [cluster_of[r["id"]] for r in valued], "score": values,
        "stderr": [result.stderr[p] for p in players], "tokens": tokens,
        "loss": losses if losses is not None else np.full(len(valued), np.nan)})
    sizes = dict(zip(proxies["cluster"].astype(int), proxies["size"].astype(int)))
    if cfg.players == "records":
        by_cluster = {c: aggregate(group["score"].to_numpy(), cfg.aggregate) for c, group in records.groupby("cluster")}
        cluster_score = {c: by_cluster[c][0] for c in clusters}
        cluster_stderr = {c: by_cluster[c][1] for c in clusters}
        counts = records.groupby("cluster").size().to_dict()
    else:
        cluster_score, cluster_stderr = result.values, result.stderr
        counts = {c: len(result.credits[c]) for c in clusters}
    scores = pd.DataFrame({
        "cluster": clusters,
        "proxy_id": [proxy_records[c]["id"] for c in clusters],
        "size": [sizes[c] for c in clusters],
        "score": [cluster_score[c] for c in clusters],
        "stderr": [cluster_stderr[c] for c in clusters],
        "credits": [counts[c] for c in clusters],
    })
    artifacts.write_scores(scores, records, lines)
    write_csv(artifacts.SCORES_PLOT, scores.sort_values(["score", "cluster"], ascending=[False, True])
              .assign(rank=range(len(scores)))[["rank", "cluster", "size", "score", "stderr"]])
    rank_corr = spearman_between_iterations(result.estimates)
    plots.shapley_png(artifacts.SHAPLEY_PNG, scores["score"].to_numpy(), scores["stderr"].to_numpy(),
                      scores["size"].to_numpy())
    plots.convergence_png(artifacts.CONVERGENCE_PNG, rank_corr)
    seconds = round(time.perf_counter() - start, 1)
    artifacts.write_metrics("shapley", {
        "method": cfg.method, "players": cfg.players, "records_valued": len(players), **method_metrics,
        "value": cfg.value, "dev_neighbours": cfg.dev_neighbours, **cut.metrics(),
        "memory_estimate_gb": round(estimate.total / memory.GB, 2) if estimate else None,
        "score_mean": float(scores["score"].mean()),
        "stderr_mean": float(np.nanmean(scores["stderr"])) if cfg.k > 1 or cfg.players == "records" else None,
        "rank_stability": rank_corr[-1] if rank_corr else None,
        # Spearman(score, response tokens) of the valued records: a score that only measured length would be near +-1.
        "length_spearman": length_correlation(values, tokens.astype(float)),
        "seconds": seconds,
    }, headline={"shapley_s": seconds}, device=cfg.device)
    log.info("%s: v(P)=%.4f v(∅)=%.4f; scores -> %s, %s, pictures -> %s", cfg.method, method_metrics["v_full"],
             method_metrics["v_empty"], artifacts.SCORES, artifacts.RECORD_SCORES, artifacts.SHAPLEY_PNG)
