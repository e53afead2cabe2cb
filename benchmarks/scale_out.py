"""Scale-out benchmark: record scoring (records/s) and retraining (jobs/h) at several workers, whether the values
stay the same, peak memory per worker, and the costed plan past one machine (docs/scale-out.md) computed from
those measurements and named assumptions.

    python benchmarks/scale_out.py                     # CPU: tiny Llama, 1 and 2 worker processes (~3 min on 2 cores)
    python benchmarks/scale_out.py --device cuda       # every GPU: SmolLM2-135M (models/smollm2), 1, 2, 4 workers per GPU
    python benchmarks/scale_out.py --executor ray      # the same on Ray actors
    python benchmarks/scale_out.py --markdown docs/results/scale_out.md              # also write the tables
    python benchmarks/scale_out.py --from-json docs/results/scale_out.json --markdown docs/results/scale_out.md \
        --doc docs/scale-out.md                        # the tables again from the saved line, the plan into the doc

Record scoring is the sample stage's and the forward valuation's pass (`shed.shards`): the pool cut into shards of
--shard records, each scored by a worker holding one model (spawned processes placed by
`shed.executors.worker_devices`, or Ray actors), timed from the first shard's start (records_per_s; with the
workers' start-up: records_per_s_with_start). Its reference is one worker in this process, as the stage runs with
shapley.workers 1; `same_values` says whether every worker count gave its floats exactly. Retraining is
benchmarks/gpu.py's measurement (`run_workers`: each worker loads once, runs one warm-up job, then the clock runs),
its jobs' values compared the same way. On a CPU every worker runs one thread, so 1 and 2 workers differ in
workers, not threads (two threads of tiny tensors on busy cores run many times slower than one: docs/gpu.md).
Peak memory per worker is the largest resident set of any worker process (psutil, polled every 0.1 s); the load
average is recorded because these 2 cores are shared.

The plan (`plan`, pure) prices the paper's retraining setting and record-level valuation of 1M records on 8, 64,
256 and 1,024 GPUs from: tokens per record measured here with the SmolLM2 tokenizer (a stand-in for LLaMA's) on
the WizardLM and Alpaca pools and the 1,444-question dev set, the paper's cutoff 1,024; padding from those lengths
batched as the code batches them; per-shard dispatch and per-job overheads and the driver's store write measured
here; docs/results/record_cost.json and scale.jsonl; and the constants below, each with its source or marked as an
assumption. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import tables  # benchmarks/, the script's own folder

tables.quiet_offline_env()
import gpu  # noqa: E402 (benchmarks/: its jobs/h measurement, tiny model and memory figures)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared/data"
POOLS = {"wizardlm": SHARED / "shed_reference/wizardlm_qocs1000.json",  # the paper's released QOCS subset
         "alpaca": SHARED / "instruction_pools/alpaca_5000.json"}
DEV_SET = SHARED / "shed_reference/devdata_1444.jsonl"  # the paper's dev set (1,444 questions as records)

# --- the plan's constants: each with its source, or "assumption" ---------------------------------------------
LLAMA_7B = gpu.ARCHS["llama-7b"]  # its config.json (benchmarks/gpu.py)
PARAMS_7B = LLAMA_7B["params"]
PEAK_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core peak, FLOP/s (NVIDIA datasheet)
MFU = 0.35  # assumption: model FLOPs utilisation of HF + PEFT LoRA steps and scoring passes at 7B on an H100
MFU_RANGE = (0.20, 0.45)  # assumption: the spread the wall times carry (unfused kernels .. well-tuned)
FORWARD_FLOPS = 2  # x parameters per token, a forward pass (the usual 2N; attention's own term left out: <10%
#                    at ~500 tokens and 4,096 wide, an assumption that under-counts long records)
TRAIN_FLOPS = 6  # x parameters per token, a LoRA step with gradient checkpointing: forward 2N, recomputed forward
#                  2N, backward through the frozen weights 2N (no weight gradients but LoRA's) (assumption)
TRAIN_FLOPS_PLAIN = 4  # the same without checkpointing (record_cost.json's CPU recipe) (assumption)
GPU_MEMORY_GIB = 80  # H100 SXM
MODEL_LOAD_S = 60  # assumption: 13.5 GB of bf16 weights from a local NVMe copy plus CUDA start, per worker; from a
#                    network filesystem or the hub, several minutes
JOB_GIB_7B = 26.5  # docs/gpu.md: the paper's recipe on LLaMA-7B, checkpointed, worst case (every record at 1,024)
WORKERS_PER_GPU_7B = 1  # assumption: a 7B job is compute-bound, so a second one on the GPU adds no throughput
PAPER = {"C": 3000, "n": 60, "k": 10, "epochs": 3, "batch": 128, "micro": 8, "cutoff": 1024, "r": 128,
         "template": "vicuna"}  # presets/paper.yaml (the paper and the authors' scripts)
POOL_1M = 1_000_000
GPU_COUNTS = (8, 64, 256, 1024)
SHARD = 512  # shapley.shard_records default
FORWARD = {"k": 1, "dev_epochs": 4, "r": 16}  # presets/records.yaml (k 1, dev_epochs 4), train.lora.r default
INRUN = {"k": 1, "epochs": 1, "r": 16}  # assumption: one run, one pass over the pool, the default rank


class RssWatch:
    """Peak resident set of each process below this one, polled every 0.1 s on a thread (psutil)."""

    def __init__(self):
        import psutil

        self.me, self.peaks, self.names = psutil.Process(), {}, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self.stop.wait(0.1):
            try:
                children = self.me.children(recursive=True)
            except psutil.Error:  # one ended while the tree was read
                continue
            for child in children:
                try:
                    rss, line = child.memory_info().rss, " ".join(child.cmdline())
                except psutil.Error:  # ended between the listing and the read
                    continue
                self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), rss)
                if line:  # a process just started or ended (a zombie) shows none
                    self.names[child.pid] = line

    def __enter__(self) -> RssWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def worker_peak_mb(self) -> float | None:
        """The largest peak of any worker process (spawned worker or Ray actor; the pool's manager and Ray's own
        daemons hold no model and stay below it)."""
        peaks = [p for pid, p in self.peaks.items() if any(k in self.names.get(pid, "") for k in ("spawn_main", "ray::"))]
        return round(max(peaks) / 2**20, 1) if peaks else None


def score_records(spec, records: list[dict], shard: int, workers: int, executor: str) -> dict:
    """One record-scoring pass over `records` in shards of `shard`: workers 0 in this process (the stage at
    shapley.workers 1), else `workers` processes or Ray actors. Figures, and the losses by id."""
    from shed import executors, shards

    tasks = shards.tasks({None: records}, shard)
    arrivals = []
    with RssWatch() as watch:
        start = time.perf_counter()
        if workers == 0:
            results = shards.score(spec, tasks, runner=spec.runner(spec.device))
        else:
            run = executors.run_ray if executor == "ray" else executors.run_processes
            results = run(spec, tasks, workers)
        for result in results:
            arrivals.append((time.perf_counter(), result))
        end = time.perf_counter()
    # The first shard's start: the workers are up (a process pool starts its workers together).
    computing = min(t - r["seconds"] for t, r in arrivals)
    busy = sum(r["seconds"] for _, r in arrivals)
    return {"workers": workers, "shards": len(tasks), "seconds": round(end - start, 2),
            "setup_s": round(max(r["setup_seconds"] for _, r in arrivals), 2),
            "records_per_s": round(len(records) / (end - computing), 1),
            "records_per_s_with_start": round(len(records) / (end - start), 1),
            # Per shard, what is not the worker's scoring: sending the shard, returning its losses, the queue.
            "shard_overhead_s": round(max(0.0, (end - computing) * max(workers, 1) - busy) / len(tasks), 4),
            "peak_rss_mb_per_worker": watch.worker_peak_mb(),
            "losses": {i: loss for _, r in arrivals for i, loss in zip(r["ids"], r["losses"])}}


def run_jobs(spec, count: int, jobs: list[dict], warmup: dict, threads: int) -> dict:
    """benchmarks/gpu.py's steady-state jobs/h at `count` workers, with their peak resident set."""
    with RssWatch() as watch:
        figures = gpu.run_workers(spec, count, jobs, warmup, threads)
    figures["peak_rss_mb_per_worker"] = watch.worker_peak_mb()
    figures["job_overhead_s"] = round(max(0.0, figures["seconds"] * count / figures["jobs"]
                                          - figures["mean_train_seconds"] - figures["mean_score_seconds"]), 3)
    return figures


def store_write_seconds(records: int, chunks: int = 20) -> float:
    """Mean seconds the driver takes to keep one shard's losses (`runstore.ForwardStore.add_losses`: ids, array,
    both sha256, each written atomically and fsynced)."""
    from shed.forward import BASE
    from shed.runstore import ForwardStore

    with tempfile.TemporaryDirectory() as tmp:
        store = ForwardStore(tmp, "base", "run")
        start = time.perf_counter()
        for c in range(chunks):
            store.add_losses(BASE, [f"{c:06d}-{i:06d}-{'0' * 50}" for i in range(records)], [1.0] * records)
        return round((time.perf_counter() - start) / chunks, 4)


def token_lengths(model: str) -> dict | None:
    """Tokens per record (prompt and response, the paper's vicuna template, cut at the cutoff) of the WizardLM and
    Alpaca pools and the dev set, with the SmolLM2 tokenizer; None where the files or the tokenizer are missing."""
    from shed.data import load_rows, normalize_pool
    from shed.models import load_tokenizer
    from shed.training import encode_record

    paths = {**POOLS, "dev": DEV_SET}
    if not all(p.is_file() for p in paths.values()) or not Path(model, "tokenizer.json").is_file():
        return None
    tokenizer = load_tokenizer(model)
    out = {}
    for name, path in paths.items():
        records = normalize_pool(load_rows(str(path)), str(path))
        whole = [len(encode_record(r, tokenizer, PAPER["template"], None)[0]) for r in records]
        out[name] = {"records": len(records), "lengths": [min(n, PAPER["cutoff"]) for n in whole],
                     "cut": sum(n > PAPER["cutoff"] for n in whole)}
    return out


# --- the plan ---------------------------------------------------------------------------------------------------

def padding(lengths: list[int], kind: str) -> float:
    """Padded over real tokens as the code batches records of these lengths: "train", batches of the paper's 128
    (seeded order) sorted longest first and cut in micro-batches of 8 (train.group_by_length); "score", shards of
    SHARD sorted longest first (`losses.response_losses`) in chunks of 8 rows (train.micro_batch) and 8,192 padded
    tokens (shapley.chunk_tokens, `memory.chunks`)."""
    import numpy as np

    from shed.memory import chunks

    order = np.random.default_rng(0).permutation(len(lengths)) if kind == "train" else np.arange(len(lengths))
    group, rows, limit = (PAPER["batch"], PAPER["micro"], 0) if kind == "train" else (SHARD, PAPER["micro"], 8192)
    padded = 0
    for start in range(0, len(order), group):
        sizes = sorted((lengths[i] for i in order[start:start + group]), reverse=True)
        padded += sum((b - a) * max(sizes[a:b]) for a, b in chunks(sizes, rows, limit))
    return padded / sum(lengths)


def list_schedule(seconds: list[float], workers: int) -> float:
    """Makespan of jobs of these durations, taken in this order, each by the first worker free (the executors'
    queue: a process pool's, Ray's ActorPool)."""
    free = [0.0] * min(workers, len(seconds) or 1)
    for s in seconds:
        heapq.heappush(free, heapq.heappop(free) + s)
    return max(free)


def plan(measured: dict) -> dict:
    """The costed plan (pure): time and GPU-hours of the paper's retraining setting and of record-level valuation
    of 1M records on each of GPU_COUNTS H100s, from `measured` (tokens per record and padding of the pools and the
    dev set, the overheads, the CPU stages of 1M records, record_cost's ratio) and the module's constants."""
    from shed.shapley import schedule

    flops = PEAK_FLOPS * MFU
    tokens = measured["tokens"]  # mean tokens per record, padding included: wizardlm_train, wizardlm_score, dev_score
    dev = measured["dev_questions"]

    def seconds(n_tokens: float, per_token: float, util: float = MFU) -> float:
        return n_tokens * per_token * PARAMS_7B / (PEAK_FLOPS * util)

    # Retraining (paper): each distinct subset of group_permutation's schedule, in its order, is one job: a 3-epoch
    # LoRA fit on its proxies (WizardLM-like records) and a scoring pass over the dev set.
    sizes = [len(s) for s in schedule("group_permutation", range(PAPER["C"]), PAPER["k"], PAPER["n"])]
    dev_pass = dev * tokens["dev_score"]

    def job(size: int, util: float = MFU) -> float:
        return (seconds(PAPER["epochs"] * size * tokens["wizardlm_train"], TRAIN_FLOPS, util)
                + seconds(dev_pass, FORWARD_FLOPS, util) + measured["job_overhead_s"])

    rows = []
    for gpus in GPU_COUNTS:
        workers = gpus * WORKERS_PER_GPU_7B
        walls = {u: MODEL_LOAD_S + list_schedule([job(s, u) for s in sizes], workers) for u in (MFU, *MFU_RANGE)}
        busy = sum(job(s) for s in sizes)
        rows.append({"setting": "retrain, paper", "gpus": gpus, "units": len(sizes), "unit": "jobs",
                     "compute_gpu_h": busy / 3600, "wall_h": walls[MFU] / 3600,
                     "wall_h_range": [walls[MFU_RANGE[1]] / 3600, walls[MFU_RANGE[0]] / 3600],
                     "gpu_h": gpus * walls[MFU] / 3600, "busy_share": busy / (gpus * walls[MFU]),
                     "limit": (f"job granularity: {len(sizes)} jobs, the longest {job(max(sizes)):.0f} s"
                               if workers > len(sizes) / 2 else "GPU compute")})

    # Forward valuation of 1M records (presets/records.yaml: k = 1): the driver fits the dev set once per run
    # (dev_epochs, one GPU, before the shards), then (k + 1) passes of 1M records in shards of SHARD on every GPU;
    # the driver keeps each finished shard (measured store write) while the workers go on.
    shards = math.ceil(POOL_1M / SHARD) * (FORWARD["k"] + 1)
    shard_s = {u: seconds(SHARD * tokens["wizardlm_score"], FORWARD_FLOPS, u) + measured["shard_overhead_s"]
               for u in (MFU, *MFU_RANGE)}
    fit_s = {u: FORWARD["k"] * (seconds(FORWARD["dev_epochs"] * dev * tokens["dev_train"], TRAIN_FLOPS, u)
                                + seconds(2 * dev_pass, FORWARD_FLOPS, u)) for u in (MFU, *MFU_RANGE)}
    for gpus in GPU_COUNTS[:3]:
        walls = {u: 2 * MODEL_LOAD_S + fit_s[u] + max(math.ceil(shards / gpus) * shard_s[u],
                                                      shards * measured["store_write_s"]) for u in shard_s}
        busy = shards * shard_s[MFU] + fit_s[MFU]
        scoring = math.ceil(shards / gpus) * shard_s[MFU]
        parts = {"model load (2x)": 2 * MODEL_LOAD_S, "dev fit on one GPU": fit_s[MFU], "shards": scoring}
        rows.append({"setting": "forward, 1M records", "gpus": gpus, "units": shards, "unit": "shards",
                     "compute_gpu_h": busy / 3600, "wall_h": walls[MFU] / 3600,
                     "wall_h_range": [walls[MFU_RANGE[1]] / 3600, walls[MFU_RANGE[0]] / 3600],
                     "gpu_h": gpus * walls[MFU] / 3600, "busy_share": busy / (gpus * walls[MFU]),
                     "driver_share": shards * measured["store_write_s"] / scoring,
                     "limit": "GPU compute" if scoring > 2 * (fit_s[MFU] + 2 * MODEL_LOAD_S) else
                     "serial parts: " + ", ".join(f"{k} {v:.0f} s" for k, v in parts.items())})

    # In-run over every record: one sequential training run per k (it does not shard), each step a per-example
    # pass over the batch and, shapley.dev_every 1, one over the whole dev set (dev gradients held for N > 1
    # would take dev x LoRA x 4 bytes); memory: weights, LoRA state, per-example gradients 2 x batch x LoRA x 4.
    steps = INRUN["epochs"] * math.ceil(POOL_1M / PAPER["batch"])
    lora = gpu.lora_parameters(LLAMA_7B, INRUN["r"])
    step_s = {u: seconds(PAPER["batch"] * tokens["wizardlm_train"] + dev * tokens["dev_train"], TRAIN_FLOPS, u)
              for u in (MFU, *MFU_RANGE)}
    dev_share = dev * tokens["dev_train"] / (PAPER["batch"] * tokens["wizardlm_train"] + dev * tokens["dev_train"])
    memory_gib = {r: (2 * PARAMS_7B + gpu.lora_parameters(LLAMA_7B, r) * (16 + 2 * PAPER["batch"] * 4)) / 2**30
                  for r in (PAPER["r"], INRUN["r"])}
    # More GPUs do not shorten it: one row, on the one GPU that works (k runs could go to k GPUs; shed runs them in turn).
    wall = {u: MODEL_LOAD_S + INRUN["k"] * steps * s for u, s in step_s.items()}
    rows.append({"setting": "in-run, 1M records", "gpus": 1, "units": INRUN["k"], "unit": "run",
                 "compute_gpu_h": (wall[MFU] - MODEL_LOAD_S) / 3600, "wall_h": wall[MFU] / 3600,
                 "wall_h_range": [wall[MFU_RANGE[1]] / 3600, wall[MFU_RANGE[0]] / 3600],
                 "gpu_h": wall[MFU] / 3600, "busy_share": (wall[MFU] - MODEL_LOAD_S) / wall[MFU],
                 "limit": f"one sequential run of {steps:,} steps, the same on 8, 64 or 256 GPUs; the dev pass is "
                          f"{dev_share:.0%} of a step"})

    # record_cost.json's check of the FLOP model: its forward valuation (k 1: two passes over the pool, a dev fit of
    # dev_epochs, two dev passes) against one fine-tuning epoch (no checkpointing), by this model and as measured.
    cost = measured["record_cost"]
    predicted = (2 * FORWARD_FLOPS * cost["pool"] + cost["dev_epochs"] * TRAIN_FLOPS_PLAIN * cost["dev"]
                 + 2 * FORWARD_FLOPS * cost["dev"]) / (TRAIN_FLOPS_PLAIN * cost["pool"])
    return {
        "rows": rows,
        "retrain_jobs": len(sizes), "retrain_job_s": {"mean": sum(job(s) for s in sizes) / len(sizes),
                                                     "longest": job(max(sizes)), "empty": job(0)},
        "forward_shard_s": shard_s[MFU], "forward_fit_s": fit_s[MFU], "inrun_step_s": step_s[MFU],
        # docs/gpu.md's rule: workers per GPU = (GPU memory - 1 GiB) / (per-job peak + 0.5 GiB of CUDA context).
        "retrain_jobs_that_fit_per_gpu": int((GPU_MEMORY_GIB - 1) // (JOB_GIB_7B + 0.5)),
        "inrun_memory_gib": {str(r): round(m, 1) for r, m in memory_gib.items()},
        "inrun_fits": {str(r): m < GPU_MEMORY_GIB for r, m in memory_gib.items()},
        "inrun_held_dev_gradients_gib": round(dev * lora * 4 / 2**30, 1),
        "cpu_stages_1m_s": measured["cpu_stages_1m_s"],
        "record_cost_check": {"measured": cost["valuation_over_epoch"], "flop_model": round(predicted, 3)},
        "effective_flops": flops,
    }


def plan_inputs(lengths: dict, overheads: dict) -> dict:
    """The plan's measured inputs: mean tokens (padded as batched) of the pools and the dev set, the overheads,
    and the figures read from docs/results."""
    import numpy as np

    results = ROOT / "docs/results"
    scale = [json.loads(line) for line in (results / "scale.jsonl").read_text().splitlines() if line.strip()]
    million = next(r for r in scale if r["records"] == POOL_1M and "static" in r["stages"])
    stages = million["stages"]
    cpu_1m = stages["prepare"]["s"] + sum(v["s"] for v in stages["static"].values() if isinstance(v, dict))
    wiz, dev = lengths["wizardlm"]["lengths"], lengths["dev"]["lengths"]
    return {"tokens": {"wizardlm_train": float(np.mean(wiz)) * padding(wiz, "train"),
                       "wizardlm_score": float(np.mean(wiz)) * padding(wiz, "score"),
                       "dev_train": float(np.mean(dev)) * padding(dev, "train"),
                       "dev_score": float(np.mean(dev)) * padding(dev, "score")},
            "dev_questions": len(dev), **overheads,
            "cpu_stages_1m_s": round(cpu_1m, 1),
            "record_cost": json.loads((results / "record_cost.json").read_text())}


# --- measuring ---------------------------------------------------------------------------------------------------

def measure(args) -> dict:
    import numpy as np
    import torch

    from shed import executors, shards
    from shed.synthetic import generate_questions

    on_gpu = args.device == "cuda"
    gpus = torch.cuda.device_count() if on_gpu else 0
    if on_gpu and not gpus:
        raise SystemExit("--device cuda: no CUDA device is visible")
    if on_gpu:
        model, train = args.model or str(gpu.SMOLLM2), gpu.train_config({})
        counts = [w * gpus for w in (1, 2, 4)]
    else:
        model, train = args.model or gpu.tiny_model(), gpu.train_config(gpu.TINY_TRAIN)
        counts = [1, 2]
        # One thread per worker at every count (the stage gives one worker both cores): 1 and 2 workers then differ
        # in workers only. Patched here, where the executors read it when they start their workers.
        executors.threads_per_worker = lambda workers: 1
        torch.set_num_threads(1)
    records, source = gpu.pool(str(gpu.ALPACA) if on_gpu and gpu.ALPACA.exists() else None, args.records)
    copies = math.ceil(args.records / len(records))  # a pool file's records repeated, each copy its own ids
    records = [{**r, "id": f"{r['id']}-{c}"} if copies > 1 else r for c in range(copies) for r in records]
    records = records[: args.records]
    device = "cuda" if on_gpu else "cpu"
    score_spec = shards.ScoreSpec(model, device, "auto", train, train.micro_batch, max_tokens=8192)

    print(f"record scoring: {len(records)} records in shards of {args.shard} ...", file=sys.stderr, flush=True)
    reference = score_records(score_spec, records, args.shard, 0, args.executor)
    scoring = {str(w): score_records(score_spec, records, args.shard, w, args.executor) for w in counts}
    same_records = all(f["losses"] == reference["losses"] for f in scoring.values())
    for f in (reference, *scoring.values()):
        del f["losses"]

    print("retraining jobs ...", file=sys.stderr, flush=True)
    dev = generate_questions(args.dev, 0, salt=11)
    with gpu.loglik_spec(model, device, train, dev) as spec:
        jobs = gpu.make_jobs(records, max(counts) * args.jobs_per_worker, args.job_records)
        warmup = gpu.make_jobs(records, 1, min(args.job_records, train.batch_size), seed=1)[0]
        retraining = {str(w): run_jobs(spec, w, jobs[: w * args.jobs_per_worker], warmup, 0 if on_gpu else 1)
                      for w in counts}
    values = [f.pop("values") for f in retraining.values()]
    same_jobs = all(v[k] == values[0][k] for v in values for k in v if k in values[0])

    overheads = {"shard_overhead_s": scoring[str(counts[0])]["shard_overhead_s"],
                 "job_overhead_s": retraining[str(counts[0])]["job_overhead_s"],
                 "store_write_s": store_write_seconds(SHARD)}
    lengths = token_lengths(str(gpu.SMOLLM2))
    measured = plan_inputs(lengths, overheads) if lengths else None
    return {
        "benchmark": "scale_out", "mode": "gpu" if on_gpu else "cpu",
        "device": torch.cuda.get_device_name(0) if on_gpu else f"cpu ({os.cpu_count()} cores)", "gpus": gpus,
        "model": model if args.model or on_gpu else "tiny Llama (benchmarks/.cache/gpu/tiny-model)",
        "executor": args.executor, "pool": source, "threads_per_worker": None if on_gpu else 1,
        "records": {"count": len(records), "shard_records": args.shard, "in_process": reference,
                    "workers": scoring, "same_values": same_records},
        "retraining": {"records_per_job": args.job_records, "dev_questions": len(dev), "workers": retraining,
                       "same_values": same_jobs},
        "same_values": same_records and same_jobs,
        "overheads": overheads,
        "tokens": {name: {"records": v["records"], "mean": round(float(np.mean(v["lengths"])), 1),
                          "median": float(np.median(v["lengths"])), "cut_at_1024": v["cut"],
                          "padding_train": round(padding(v["lengths"], "train"), 3),
                          "padding_score": round(padding(v["lengths"], "score"), 3)}
                   for name, v in (lengths or {}).items()} or None,
        "plan_inputs": measured, "plan": plan(measured) if measured else None,
    }


# --- Markdown -----------------------------------------------------------------------------------------------------

def hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"


def markdown(result: dict, source: str | None) -> str:
    lines, origin = tables.header("scale_out.py", source)
    rec, ret = result["records"], result["retraining"]
    lines += [f"Source: {origin}. {result['device']}, {result['model']}, executor {result['executor']}"
              + (f", {result['threads_per_worker']} thread per worker" if result["threads_per_worker"] else "")
              + f"; load average {', '.join(map(str, result['load_average']['start']))} at the start, "
              f"{', '.join(map(str, result['load_average']['end']))} at the end "
              "(other work shared these cores: the figures are lower bounds).", "",
              f"**Measured.** Record scoring: {rec['count']:,} records in shards of {rec['shard_records']} "
              f"(`shed.shards`); retraining: jobs of {ret['records_per_job']} records, {ret['dev_questions']} dev "
              "questions (benchmarks/gpu.py's `run_workers`). Same values: "
              + ("every worker count gave the one-worker floats exactly." if result["same_values"] else
                 f"NO (record losses {rec['same_values']}, job values {ret['same_values']}).") + "", "",
              "| workers | records/s | records/s with start-up | jobs/h | peak RSS per worker (scoring / jobs) | "
              "same values |", "|---|---|---|---|---|---|",
              f"| 1, in this process (the stage's shapley.workers 1) | {rec['in_process']['records_per_s']} | "
              f"{rec['in_process']['records_per_s_with_start']} | | | reference |"]
    for w, f in rec["workers"].items():
        j, gpus = ret["workers"][w], result["gpus"]
        lines.append(f"| {f'{int(w) // gpus} per GPU ({w})' if gpus else w} | {f['records_per_s']} | {f['records_per_s_with_start']} | {j['jobs_per_hour']} | "
                     f"{f['peak_rss_mb_per_worker']} MB / {j['peak_rss_mb_per_worker']} MB | "
                     f"{'yes' if rec['same_values'] and ret['same_values'] else 'no'} |")
    o = result["overheads"]
    lines += ["", f"Overheads: {o['shard_overhead_s'] * 1000:.1f} ms per shard (dispatch and results), "
              f"{o['job_overhead_s']:.2f} s per job beyond training and scoring, "
              f"{o['store_write_s'] * 1000:.1f} ms for the driver to keep one {SHARD}-record shard "
              "(`ForwardStore.add_losses`, fsynced).", ""]
    if result.get("tokens"):
        lines += ["**Tokens per record** (SmolLM2 tokenizer, vicuna template, cut at 1,024; padding: padded over "
                  "real tokens as training batches them (128 per step, micro-batches of 8, grouped by length) and as "
                  f"scoring does (shards of {SHARD}, longest first, 8 a pass)):", "",
                  "| set | records | mean | median | cut at 1,024 | padding, training | padding, scoring |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {t['records']:,} | {t['mean']} | {t['median']:.0f} | {t['cut_at_1024']} | "
                  f"{t['padding_train']} | {t['padding_score']} |" for name, t in result["tokens"].items()]
        lines.append("")
    return "\n".join(lines + plan_markdown(result))


def plan_markdown(result: dict) -> list[str]:
    """The plan's table and the figures behind it (the results file's and docs/scale-out.md's block)."""
    p = result.get("plan")
    if not p:
        return ["No plan: the token counts need ../shared/data and models/smollm2 (`shed fetch-model`).", ""]
    lo, hi = MFU_RANGE
    lines = [f"**The plan** (`plan` in benchmarks/scale_out.py): H100 SXM at {PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 "
             f"and {MFU:.0%} utilisation (range: {lo:.0%} to {hi:.0%}); LLaMA-7B, {FORWARD_FLOPS}N FLOPs per token "
             f"forward and {TRAIN_FLOPS}N per LoRA training token (checkpointed); {MODEL_LOAD_S} s to load the model "
             "per worker; tokens per record of the WizardLM pool. GPU-hours paid: GPUs x wall; busy: the share of "
             "them computing.", "",
             "| setting | GPUs | work | compute GPU-h | wall | wall, utilisation range | GPU-h paid | busy | "
             "what limits it |", "|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        lines.append(f"| {r['setting']} | {r['gpus']:,} | {r['units']:,} {r['unit']} | {r['compute_gpu_h']:.1f} | "
                     f"{hours(r['wall_h'])} | {hours(r['wall_h_range'][0])} to {hours(r['wall_h_range'][1])} | "
                     f"{r['gpu_h']:.0f} | {r['busy_share']:.0%} | {r['limit']} |")
    j, forward = p["retrain_job_s"], [r for r in p["rows"] if r["setting"].startswith("forward")]
    lines += ["", f"- Retraining: {p['retrain_jobs']} distinct jobs (k (⌈C/n⌉ − 1) + 2: v(P) and v(∅) are shared by "
              f"the k orders), {j['mean']:.0f} s on average, the longest (all {PAPER['C']:,} proxies) "
              f"{j['longest']:.0f} s, the empty one (dev scoring only) {j['empty']:.1f} s; "
              f"{p['retrain_jobs_that_fit_per_gpu']} jobs would fit an {GPU_MEMORY_GIB} GB GPU, but a 7B job keeps "
              "it busy alone (assumed: one worker per GPU).",
              f"- Forward: {p['forward_shard_s']:.1f} s per {SHARD}-record shard, {p['forward_fit_s']:.0f} s for the "
              "dev fit on the driver's GPU; the driver keeps each shard in "
              f"{result['overheads']['store_write_s'] * 1000:.0f} ms, busy "
              + ", ".join(f"{r['driver_share']:.0%} on {r['gpus']}" for r in forward) + " GPUs.",
              f"- In-run: {p['inrun_step_s']:.1f} s per step; peak memory {p['inrun_memory_gib'][str(PAPER['r'])]} GiB "
              f"at the paper's rank {PAPER['r']} ({'fits' if p['inrun_fits'][str(PAPER['r'])] else 'does not fit'} "
              f"{GPU_MEMORY_GIB} GB), {p['inrun_memory_gib'][str(INRUN['r'])]} GiB at rank {INRUN['r']} (the row's), "
              "activations aside; holding the dev gradients (shapley.dev_every > 1) would take "
              f"{p['inrun_held_dev_gradients_gib']} GiB.",
              f"- The CPU stages of 1M records (prepare, embed, cluster, sample): {p['cpu_stages_1m_s']:.0f} s on 2 cores "
              "(docs/results/scale.md), on one machine.",
              f"- FLOP-model check: record_cost.json measured the forward valuation of 1,000 records at "
              f"{p['record_cost_check']['measured']} of a fine-tuning epoch (SmolLM2-135M, CPU); the FLOP model says "
              f"{p['record_cost_check']['flop_model']}.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: spawned worker processes; ray: Ray actors")
    parser.add_argument("--model", help="a model directory (default: CPU the tiny Llama, GPU models/smollm2)")
    parser.add_argument("--records", type=int, help="records scored (default: CPU 4096, GPU 65536)")
    parser.add_argument("--shard", type=int, help="records per shard (default: CPU 256, GPU 512)")
    parser.add_argument("--job-records", type=int, help="records per retraining job (default: CPU 32, GPU 256)")
    parser.add_argument("--jobs-per-worker", type=int, help="jobs timed per worker (default: CPU 8, GPU 2)")
    parser.add_argument("--dev", type=int, help="dev questions per job (default: CPU 32, GPU 64)")
    parser.add_argument("--doc", metavar="PATH", help="also write the plan into PATH's scale_out block "
                        "(docs/scale-out.md)")
    tables.add_arguments(parser)
    args = parser.parse_args()
    if args.from_json and args.doc:
        tables.write_block(args.doc, "scale_out", "\n".join(plan_markdown(tables.read_json_line(args.from_json))))
    if tables.render_saved(args, markdown):
        return
    defaults = {"records": 65536, "shard": 512, "job_records": 256, "dev": 64, "jobs_per_worker": 2} \
        if args.device == "cuda" else {"records": 4096, "shard": 256, "job_records": 32, "dev": 32, "jobs_per_worker": 8}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    load = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    result = measure(args)
    result["load_average"] = {"start": load, "end": [round(x, 2) for x in os.getloadavg()]}
    result["cores"] = os.cpu_count()
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    if args.markdown:
        tables.write_markdown(markdown(result, None), args.markdown)
    if args.doc:
        tables.write_block(args.doc, "scale_out", "\n".join(plan_markdown(result)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
