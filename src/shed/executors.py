"""Running fine-tune-and-score jobs: in-process, in worker processes, or as Ray actors.

A job is (key, proxy records, seed); its value depends on nothing else, so any executor gives
the same values as any other. Each worker loads the model, tokenizer and dev set once and then
runs many jobs (the authors started a fresh process per job, reloading a 7B model each time).
Executors yield results as jobs finish, so the caller records each one the moment it completes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from shed.config import Params


class JobRunner:
    """v(S) for one worker: a loaded base model and a fresh LoRA adapter per job."""

    def __init__(self, params: Params, dev: list[dict], dev_path: str, device: str, threads: int = 0):
        import torch

        from shed.models import load_causal_lm
        from shed.training import LoraTrainer

        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        cfg = params.shapley
        self.dev = dev
        model, self.tokenizer = load_causal_lm(cfg.model, device, cfg.dtype)
        self.trainer = LoraTrainer(model, self.tokenizer, params.train)
        self.value_kind = cfg.value
        if cfg.value == "accuracy":
            from shed.scoring import LmEvalScorer, mc_task_config

            self.scorer = LmEvalScorer(self.tokenizer, [mc_task_config("shed_dev", dev_path)])
        self.setup_seconds = time.perf_counter() - start

    def score(self) -> tuple[float, list[float] | None]:
        """The dev score, and each dev question's own (None from lm-eval accuracy)."""
        from shed.scoring import choice_logprob, gold_loglik

        if self.value_kind == "loglik":
            return gold_loglik(self.trainer.model, self.tokenizer, self.dev)
        if self.value_kind == "choice_logprob":
            return choice_logprob(self.trainer.model, self.tokenizer, self.dev)
        return self.scorer(self.trainer.model)["shed_dev"]["acc"], None

    def run(self, job: dict) -> dict:
        """job: {key, records, seed} -> {key, value, questions, size, train_loss, *_seconds}."""
        t0 = time.perf_counter()
        fit = self.trainer.fit(job["records"], seed=job["seed"])
        t1 = time.perf_counter()
        value, questions = self.score()
        t2 = time.perf_counter()
        return {"key": job["key"], "value": float(value), "questions": questions, "size": len(job["records"]),
                "train_loss": fit["loss"], "train_seconds": t1 - t0, "score_seconds": t2 - t1, "job_seconds": t2 - t0}


def worker_devices(device: str, workers: int) -> list[str]:
    """One accelerator per worker where there are enough (cuda:i), else the CPU for all."""
    import torch

    from shed.models import resolve_device

    device = resolve_device(device)
    if device == "cuda" and workers > 1:
        if torch.cuda.device_count() < workers:
            from shed.fileio import ShedError

            raise ShedError(f"shapley.workers: {workers} workers need {workers} GPUs, found {torch.cuda.device_count()}")
        return [f"cuda:{i}" for i in range(workers)]
    return [device] * workers


def threads_per_worker(workers: int) -> int:
    """Split the CPU cores between CPU workers so they do not oversubscribe each other."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_local(params: Params, dev: list[dict], dev_path: str, jobs: list[dict], stats: dict) -> Iterator[dict]:
    runner = JobRunner(params, dev, dev_path, worker_devices(params.shapley.device, 1)[0])
    stats["setup_seconds"] = runner.setup_seconds
    for job in jobs:
        yield runner.run(job)


_RUNNER: JobRunner | None = None  # the worker process's runner, loaded once by _init_worker


def _init_worker(params: Params, dev: list[dict], dev_path: str, devices: list[str], threads: int, slots) -> None:
    global _RUNNER
    slot = slots.get()  # which device this process owns
    _RUNNER = JobRunner(params, dev, dev_path, devices[slot], threads if devices[slot] == "cpu" else 0)


def _run_in_worker(job: dict) -> dict:
    return _RUNNER.run(job)


def run_processes(params: Params, dev: list[dict], dev_path: str, jobs: list[dict], stats: dict) -> Iterator[dict]:
    """`shapley.workers` spawned processes (spawn: no forked torch/CUDA state), each owning a device."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = params.shapley.workers
    devices = worker_devices(params.shapley.device, workers)
    context = multiprocessing.get_context("spawn")
    slots = context.Manager().Queue()
    for i in range(workers):
        slots.put(i)
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(params, dev, dev_path, devices, threads_per_worker(workers), slots)) as pool:
        pending = {pool.submit(_run_in_worker, job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: f.result()["key"]):
                result = future.result()
                stats.setdefault("setup_seconds", time.perf_counter() - start - result["job_seconds"])
                yield result


def run_ray(params: Params, dev: list[dict], dev_path: str, jobs: list[dict], stats: dict) -> Iterator[dict]:
    """The same jobs on Ray actors (one GPU each where there are GPUs), e.g. across a cluster."""
    try:
        import ray
    except ImportError:
        from shed.fileio import ShedError

        raise ShedError("shapley.executor: ray needs Ray (pip install 'shed[ray]')") from None
    import torch

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    gpus = 1 if torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) >= 1 else 0
    workers = params.shapley.workers
    threads = threads_per_worker(workers)
    actor = ray.remote(num_gpus=gpus, num_cpus=1)(JobRunner)
    device = "cuda" if gpus else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES: each actor sees its own GPU as cuda
    actors = [actor.remote(params, dev, dev_path, device, 0 if gpus else threads) for _ in range(workers)]
    start = time.perf_counter()
    queue = list(reversed(jobs))
    running = {}
    for a in actors:
        if queue:
            running[a.run.remote(queue.pop())] = a
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        a = running.pop(done[0])
        result = ray.get(done[0])
        stats.setdefault("setup_seconds", time.perf_counter() - start - result["job_seconds"])
        if queue:
            running[a.run.remote(queue.pop())] = a
        yield result
    for a in actors:
        ray.kill(a)


EXECUTORS = {"local": run_local, "processes": run_processes, "ray": run_ray}
