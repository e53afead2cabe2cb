"""Running jobs on workers: in-process, in worker processes, or as Ray actors.

A spec says what a worker loads once and `spec.runner(device, threads)` builds it: a `JobSpec` runs
fine-tune-and-score jobs (key, proxy records, seed) with a model, recipe and value; shed.shards' `ScoreSpec`
scores shards of records. A job's result depends on nothing but the job and the spec, so any executor gives
the same results as any other. Each worker loads the model, tokenizer and dev set once and then runs many jobs
(the authors started a fresh process per job, reloading a 7B model each time); several workers may share a GPU.
Executors yield results as jobs finish, so the caller records each one the moment it completes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from shed.config import TrainConfig
from shed.fileio import ShedError, install_hint


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs to run jobs: the model, the fine-tuning recipe and the value function."""

    model: str
    device: str
    dtype: str
    train: TrainConfig
    value: str  # loglik | choice_logprob | accuracy (these two: multiple-choice dev questions only)
    dev: list[dict]  # the dev questions, or instruction records (value loglik)
    dev_path: str  # the same questions as a file (lm-eval reads files)
    dev_max_length: int | None = None  # tokens a dev item is cut at (shapley.dev_max_length resolved; None: uncut)
    chunk_tokens: int = 0  # padded tokens per pass of the dev score (shapley.chunk_tokens; 0: no bound)

    def runner(self, device: str, threads: int = 0) -> JobRunner:
        """A worker's runner: the executors build one per worker from any spec with this method (shed.shards'
        ScoreSpec too)."""
        return JobRunner(self, device, threads)


class JobRunner:
    """v(S) for one worker: a loaded base model and a fresh LoRA adapter per job."""

    def __init__(self, spec: JobSpec, device: str, threads: int = 0):
        import torch

        from shed.models import load_causal_lm
        from shed.prompts import spans
        from shed.scoring import dev_kind
        from shed.training import LoraTrainer

        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        self.dev = spec.dev
        model, self.tokenizer = load_causal_lm(spec.model, device, spec.dtype)
        self.trainer = LoraTrainer(model, self.tokenizer, spec.train)
        self.value_kind = spec.value
        self.cut = {"max_length": spec.dev_max_length, "max_tokens": spec.chunk_tokens}
        # A dev set of instruction records: each record's spans, prompted as training prompts it.
        self.prompts = ([spans(r, spec.train.template, self.tokenizer) for r in spec.dev]
                        if dev_kind(spec.dev) == "records" else None)
        if spec.value == "accuracy":
            from shed.scoring import LmEvalScorer, mc_task_config

            self.scorer = LmEvalScorer(self.tokenizer, [mc_task_config("shed_dev", spec.dev_path)])
        self.setup_seconds = time.perf_counter() - start  # reported with this worker's first job

    def score(self) -> tuple[float, list[float] | None]:
        """The dev score, and each dev item's own (None from lm-eval accuracy, which cuts items its own way)."""
        from shed.scoring import choice_logprob, gold_loglik, response_loglik

        if self.value_kind == "loglik" and self.prompts is not None:
            return response_loglik(self.trainer.model, self.tokenizer, self.prompts, **self.cut)
        if self.value_kind == "loglik":
            return gold_loglik(self.trainer.model, self.tokenizer, self.dev, **self.cut)
        if self.value_kind == "choice_logprob":
            return choice_logprob(self.trainer.model, self.tokenizer, self.dev, **self.cut)
        return self.scorer(self.trainer.model)["shed_dev"]["acc"], None

    def run(self, job: dict) -> dict:
        """job: {key, records, seed} -> {key, value, questions, size, train_loss, *_seconds}; the
        worker's first result also carries its setup time (loading the model)."""
        setup, self.setup_seconds = self.setup_seconds, 0.0
        t0 = time.perf_counter()
        fit = self.trainer.fit(job["records"], seed=job["seed"])
        t1 = time.perf_counter()
        value, questions = self.score()
        t2 = time.perf_counter()
        return {"key": job["key"], "value": float(value), "questions": questions, "size": len(job["records"]),
                "train_loss": fit["loss"], "train_seconds": t1 - t0, "score_seconds": t2 - t1, "job_seconds": t2 - t0,
                "setup_seconds": setup}


def worker_devices(device: str, workers: int) -> list[str]:
    """Each worker's device: for "cuda" (or "auto" on a GPU machine) the GPUs round robin, cuda:0,
    cuda:1, ..., cuda:0, ..., so `workers` may exceed the GPU count (several small jobs share a GPU);
    a named device (cpu, cuda:1, ...) for all workers."""
    import torch

    from shed.models import resolve_device

    device = resolve_device(device)
    if device == "cuda" and workers > 1:
        count = torch.cuda.device_count()
        if count < 1:
            raise ShedError("shapley.device: cuda, but no CUDA device is visible")
        return [f"cuda:{i % count}" for i in range(workers)]
    return [device] * workers


def workers_on_device(device: str, workers: int) -> int:
    """How many of `workers` local workers share one device (`worker_devices`): each holds its own model there."""
    import torch

    from shed.models import resolve_device

    gpus = torch.cuda.device_count() if resolve_device(device) == "cuda" else 0
    return math.ceil(workers / gpus) if gpus else workers


def threads_per_worker(workers: int) -> int:
    """Split the CPU cores between CPU workers so they do not oversubscribe each other."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_local(spec: JobSpec, jobs: list[dict], workers: int = 1) -> Iterator[dict]:
    runner = spec.runner(worker_devices(spec.device, 1)[0])
    for job in jobs:
        yield runner.run(job)


_RUNNER = None  # the worker process's runner, loaded once by _init_worker


def _init_worker(spec: JobSpec, devices: list[str], threads: int, slots) -> None:
    global _RUNNER
    slot = slots.get()  # which device this process runs on (GPUs may host several workers)
    # CPU threads split between the workers on any device: several workers per GPU would otherwise each
    # start a thread per core for their CPU-side work.
    _RUNNER = spec.runner(devices[slot], threads)


def _run_in_worker(job: dict) -> dict:
    return _RUNNER.run(job)


def run_processes(spec: JobSpec, jobs: list[dict], workers: int) -> Iterator[dict]:
    """`workers` spawned processes (spawn: no forked torch/CUDA state), placed by `worker_devices`."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    devices = worker_devices(spec.device, workers)
    context = multiprocessing.get_context("spawn")
    slots = context.Manager().Queue()
    for i in range(workers):
        slots.put(i)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(spec, devices, threads_per_worker(workers), slots)) as pool:
        pending = {pool.submit(_run_in_worker, job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: f.result()["key"]):
                yield future.result()


def run_ray(spec: JobSpec, jobs: list[dict], workers: int) -> Iterator[dict]:
    """The same jobs on Ray actors, e.g. across a cluster. Where there are GPUs each actor asks for an
    equal share of one, 1 / ceil(workers / GPUs in the cluster), so more workers than GPUs pack several
    actors onto each GPU (as `worker_devices` does locally) and every actor fits."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ShedError(f"shapley.executor: ray needs Ray ({install_hint('ray')})") from None
    import torch

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    cluster_gpus = cluster_gpus or (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    gpus = 1 / math.ceil(workers / cluster_gpus) if cluster_gpus else 0
    threads = threads_per_worker(workers)
    actor = ray.remote(num_gpus=gpus, num_cpus=1)(RayWorker)
    device = "cuda" if gpus else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES: each actor sees its own GPU as cuda
    actors = [actor.remote(spec, device, 0 if gpus else threads) for _ in range(workers)]
    try:
        # Ray's own scheduling: each job goes to the next idle actor, results come back as they finish.
        yield from ActorPool(actors).map_unordered(lambda a, job: a.run.remote(job), jobs)
    finally:
        for a in actors:
            ray.kill(a)


class RayWorker:
    """A Ray actor holding one worker's runner (`spec.runner`), loaded once."""

    def __init__(self, spec, device: str, threads: int):
        self.runner = spec.runner(device, threads)

    def run(self, job: dict) -> dict:
        return self.runner.run(job)


EXECUTORS = {"local": run_local, "processes": run_processes, "ray": run_ray}


def run_jobs(spec: JobSpec, jobs: list[dict], workers: int = 1, executor: str = "local") -> Iterator[dict]:
    """Each job's result as it finishes: in-process (1 local worker), in processes, or on Ray."""
    name = "ray" if executor == "ray" else "local" if workers == 1 else "processes"
    return EXECUTORS[name](spec, jobs, workers)
