"""Running jobs on workers: in-process, in worker processes, or as Ray actors.

A spec says what a worker loads once and `spec.runner(device, threads)` builds it: a `JobSpec` runs
fine-tune-and-score jobs (key, proxy records, seed) with a model, recipe and value; shed.shards' `ScoreSpec`
scores shards of records. A job's result depends on nothing but the job and the spec, so any executor gives
the same results as any other. Each worker loads the model, tokenizer and dev set once and then runs many jobs
(the authors started a fresh process per job, reloading a 7B model each time); several workers may share a GPU.
Executors yield results as jobs finish, so the caller records each one the moment it completes.
A worker that dies (killed, out of memory, a crash) does not end the run: the jobs not yet finished run
on a fresh worker, each lost at most `max_retries` times (shapley.max_retries), and give the same values.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from shed.config import TrainConfig
from shed.fileio import ShedError, install_hint

log = logging.getLogger(__name__)


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
                "setup_seconds": setup, "pid": os.getpid()}


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


def run_local(spec: JobSpec, jobs: list[dict], workers: int = 1, max_retries: int = 0) -> Iterator[dict]:
    # In this process nothing is retried: a death here is the stage's own, and a rerun resumes from the job store.
    runner = spec.runner(worker_devices(spec.device, 1)[0])
    for job in jobs:
        yield runner.run(job)


_RUNNER = None  # the worker process's runner (`spec.runner`), or why it failed to load
_STARTED = None  # the worker process's channel telling the parent which job it starts


def _init_worker(spec: JobSpec, devices: list[str], threads: int, slots, started) -> None:
    global _RUNNER, _STARTED
    _STARTED = started
    slot = slots.get()  # which device this process runs on (GPUs may host several workers)
    # CPU threads split between the workers on any device: several workers per GPU would otherwise each
    # start a thread per core for their CPU-side work.
    try:
        _RUNNER = spec.runner(devices[slot], threads)
    except Exception as exc:  # raised with the first job: a load error is the user's to fix, not a death to retry
        _RUNNER = exc


def _run_in_worker(job: dict) -> dict:
    if isinstance(_RUNNER, Exception):
        raise _RUNNER
    _STARTED.put((os.getpid(), job["key"]))  # synchronous: the parent learns which job a dead worker held
    return _RUNNER.run(job)


def _death(exitcode: int | None) -> str:
    """How a worker process ended, in words."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
        return f"killed by {name}"
    return "died" if exitcode is None else f"exited with status {exitcode}"


def _given_up(key: str, how: str, finished: int, max_retries: int) -> ShedError:
    """The one-line error for a job whose worker died once too often."""
    return ShedError(f"shapley.max_retries={max_retries}: job {key} {how}; the {finished} jobs finished before "
                     "are kept, a rerun resumes there")


def _drain(started, running: dict[int, str]) -> None:
    """Read the workers' "pid starts job" messages into `running` (read often: a full pipe would block them)."""
    while not started.empty():
        pid, key = started.get()
        running[pid] = key


def _some(keys) -> str:
    """Job keys for a log line: the first five, and how many more."""
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _lost_jobs(processes: dict, running: dict[int, str], left: dict) -> tuple[list[str], str]:
    """After a pool broke: (the unfinished jobs its dead workers were running, how they died)."""
    # The pool SIGTERMs the survivors, so a worker that ended otherwise is one that died; where none can be
    # told apart, every running job counts.
    deaths = {pid: p.exitcode for pid, p in processes.items() if p.exitcode not in (0, -signal.SIGTERM)}
    lost = [key for pid, key in running.items() if key in left and (pid in deaths or not deaths)]
    how: dict[str, list[str]] = {}
    for pid, code in deaths.items():
        how.setdefault(_death(code), []).append(str(pid))
    cause = "; ".join(f"worker process{'es' * (len(pids) > 1)} {_some(pids)} {end}" for end, pids in how.items())
    if -signal.SIGKILL in deaths.values():
        cause += " (the kernel's out-of-memory killer sends SIGKILL)"
    return lost, cause or "a worker process died"


def run_processes(spec: JobSpec, jobs: list[dict], workers: int, max_retries: int = 2) -> Iterator[dict]:
    """`workers` spawned processes (spawn: no forked torch/CUDA state), placed by `worker_devices`.

    A worker that dies breaks the whole pool (ProcessPoolExecutor's design): the results it already has are
    yielded, and a fresh pool runs the jobs not yet yielded. A job running on the dead worker counts a retry
    (every unfinished job does where the pool died before finishing one: loading the model, say); a job past
    `max_retries` retries fails the stage."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    devices = worker_devices(spec.device, workers)
    context = multiprocessing.get_context("spawn")
    left = {job["key"]: job for job in jobs}  # not yet yielded: what a fresh pool runs
    losses: Counter[str] = Counter()
    finished = 0
    while left:
        slots, started = context.SimpleQueue(), context.SimpleQueue()
        for i in range(workers):
            slots.put(i)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                   initargs=(spec, devices, threads_per_worker(workers), slots, started))
        running: dict[int, str] = {}  # worker pid -> the job it took last
        broken, progressed = False, False
        pending = {}
        try:
            try:
                for key, job in left.items():
                    pending[pool.submit(_run_in_worker, job)] = key
            except BrokenProcessPool:  # a worker died before all were in: those in fail alike
                broken = True
            processes = dict(pool._processes)  # pid -> Process (spawned by submit): how each worker ended
            while pending:
                if broken:  # stopping, the pool fails every future it knows: the results among them count
                    pool.shutdown(wait=True)
                    pending = {f: key for f, key in pending.items() if f.done()}  # a submit racing the break: lost
                    done = list(pending)
                else:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                _drain(started, running)
                for future in sorted(done, key=pending.get):
                    key = pending.pop(future)
                    if isinstance(future.exception(), BrokenProcessPool):
                        broken = True
                        continue
                    result = future.result()  # a job's own error (not a death) is raised as it is
                    del left[key]
                    finished, progressed = finished + 1, True
                    yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if not broken:
            continue
        _drain(started, running)
        lost, cause = _lost_jobs(processes, running, left)
        lost = lost or ([] if progressed else list(left))  # a pool that finished nothing held every job up
        losses.update(lost)
        worst = max(lost, key=losses.__getitem__, default="")
        if lost and losses[worst] > max_retries:
            raise _given_up(worst, f"lost its worker process {losses[worst]} times (last: {cause})", finished,
                            max_retries)
        cost = (f", costing job {_some(lost)} a retry ({losses[worst]} of shapley.max_retries={max_retries})"
                if lost else " between jobs")
        log.warning("%s%s: a fresh pool of %d runs the %d unfinished jobs (%s)", cause, cost, workers, len(left),
                    _some(left))


def run_ray(spec: JobSpec, jobs: list[dict], workers: int, max_retries: int = 2) -> Iterator[dict]:
    """The same jobs on Ray actors, e.g. across a cluster. Where there are GPUs each actor asks for an
    equal share of one, 1 / ceil(workers / GPUs in the cluster), so more workers than GPUs pack several
    actors onto each GPU (as `worker_devices` does locally) and every actor fits.

    An actor whose process dies is restarted by Ray (reloading the model) and Ray runs its lost call again:
    `max_retries` bounds both, each actor's restarts and each call's retries."""
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
    actor = ray.remote(num_gpus=gpus, num_cpus=1, max_restarts=max_retries,
                       max_task_retries=max_retries)(RayWorker)
    device = "cuda" if gpus else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES: each actor sees its own GPU as cuda
    actors = [actor.remote(spec, device, 0 if gpus else threads) for _ in range(workers)]
    calls: dict = {}  # call -> job key, for the error that names a job Ray gave up on
    known: dict[str, tuple[int, int]] = {}  # actor id -> (its number here, its process as its last result says)
    finished = 0

    def call(a, job: dict):
        ref = a.run.remote(job)
        calls[ref] = job["key"]
        return ref

    try:
        # Ray's own scheduling: each job goes to the next idle actor, results come back as they finish.
        for result in ActorPool(actors).map_unordered(call, jobs):
            number, pid = known.get(result["actor"], (len(known), None))
            if result.pop("restarted") and pid != result["pid"]:
                # One call in flight per actor: the first job back from a new process is the one Ray retried.
                log.warning("Ray actor %d was restarted (process %s died): job %s ran again on process %d (retried "
                            "by Ray, at most shapley.max_retries=%d times)", number, pid or "of its first job",
                            result["key"], result["pid"], max_retries)
            known[result.pop("actor")] = (number, result["pid"])
            finished += 1
            yield result
    except ray.exceptions.RayActorError as exc:
        if exc.actor_init_failed:  # an error loading the model: the user's to fix, raised as it is
            raise
        raise _given_up(_failed_call(calls), f"lost its Ray actor and Ray gave up ({str(exc).splitlines()[0]})",
                        finished, max_retries) from None
    finally:
        for a in actors:
            ray.kill(a)


def _failed_call(calls: dict) -> str:
    """The job of the call Ray gave up on: a finished call whose result is an actor error."""
    import ray

    done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=0)
    for ref in done:
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError:
            return calls[ref]
    return "(unknown)"


class RayWorker:
    """A Ray actor holding one worker's runner (`spec.runner`), loaded once; its results say which actor ran
    them and whether Ray restarted it (after its process died)."""

    def __init__(self, spec, device: str, threads: int):
        self.runner = spec.runner(device, threads)

    def run(self, job: dict) -> dict:
        import ray

        context = ray.get_runtime_context()
        return {**self.runner.run(job), "pid": os.getpid(), "actor": context.get_actor_id(),
                "restarted": context.was_current_actor_reconstructed}


EXECUTORS = {"local": run_local, "processes": run_processes, "ray": run_ray}


def run_jobs(spec: JobSpec, jobs: list[dict], workers: int = 1, executor: str = "local",
             max_retries: int = 2) -> Iterator[dict]:
    """Each job's result as it finishes: in-process (1 local worker), in processes, or on Ray; a job whose
    worker dies runs again on a fresh one, at most `max_retries` times."""
    name = "ray" if executor == "ray" else "local" if workers == 1 else "processes"
    return EXECUTORS[name](spec, jobs, workers, max_retries)
