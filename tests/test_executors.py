"""The job executors survive a lost worker: a killed worker process or Ray actor costs only the jobs it held,
which run again with the same values; a job lost too often fails with one line, keeping the finished ones."""

import logging
import os
import signal
import threading

import pytest

from shed.config import TrainConfig
from shed.executors import JobSpec, run_jobs
from shed.fileio import ShedError
from shed.jobstore import JobStore

WORDS = "red green blue cyan pink gold teal navy plum".split()
RECORDS = [{"id": f"r{i}", "instruction": f"Say {w}.", "input": "", "output": w} for i, w in enumerate(WORDS)]
JOBS = [{"key": f"job{i}", "records": RECORDS[i % 7:i % 7 + 3], "seed": i // 7} for i in range(12)]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """A tiny saved model valued by its loss on three instruction records."""
    from helpers import tiny_random_lm

    path = tmp_path_factory.mktemp("model")
    model, tokenizer = tiny_random_lm()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return JobSpec(model=str(path), device="cpu", dtype="float32", train=TrainConfig(), value="loglik",
                   dev=RECORDS[:3], dev_path="")


@pytest.fixture(scope="module")
def fault_free(spec, one_thread):
    """Each job's value from one in-process worker that nothing kills."""
    return {r["key"]: r["value"] for r in run_jobs(spec, JOBS)}


def warnings_naming(caplog, keys) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "shed.executors" and r.levelno == logging.WARNING and any(k in r.getMessage() for k in keys)]


@pytest.mark.slow  # two pools of spawned workers, each importing torch (~15 s on 2 busy cores)
def test_a_killed_pool_worker_costs_only_its_job_which_runs_again_with_the_same_value(spec, fault_free, caplog):
    caplog.set_level(logging.WARNING, logger="shed.executors")
    values, killed = {}, None
    for result in run_jobs(spec, JOBS, workers=2, max_retries=2):
        if killed is None:  # the worker that sent the first result has taken its next job: kill it mid-job
            killed, first = result["pid"], result["key"]
            os.kill(killed, signal.SIGKILL)
        assert result["key"] not in values  # a yielded job never runs again
        values[result["key"]] = result["value"]
    assert values == fault_free  # every job, the same value as without the fault
    retried = warnings_naming(caplog, [k for k in fault_free if k != first])
    assert len(retried) == 1 and f"worker process {killed} killed by SIGKILL" in retried[0]


@pytest.mark.slow  # a local Ray cluster, and two actors importing torch (~30 s)
def test_a_killed_ray_actor_restarts_and_ray_retries_its_job_with_the_same_value(spec, fault_free, caplog):
    ray = pytest.importorskip("ray")
    caplog.set_level(logging.WARNING, logger="shed.executors")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        values, killed = {}, None
        for result in run_jobs(spec, JOBS, workers=2, executor="ray", max_retries=2):
            if killed is None:  # its actor already holds its next job: kill the actor's process mid-job
                killed = result["pid"]
                os.kill(killed, signal.SIGKILL)
            values[result["key"]] = result["value"]
    finally:
        ray.shutdown()
    assert values == fault_free
    retried = warnings_naming(caplog, fault_free)
    assert len(retried) == 1 and f"(process {killed} died)" in retried[0]


class NotifyingStore(JobStore):
    """A job store that says when it has recorded its first job."""

    first = threading.Event()

    def put(self, *args, **kwargs):
        super().put(*args, **kwargs)
        self.first.set()


@pytest.mark.slow  # a pool of spawned workers importing torch (~15 s)
def test_a_job_that_keeps_losing_its_worker_fails_in_one_line_and_the_finished_jobs_stay_stored(
        spec, fault_free, tmp_path):
    psutil = pytest.importorskip("psutil")
    from shed.stages.shapley import run_and_record

    before = {p.pid for p in psutil.Process().children()}
    stop, failures = threading.Event(), []

    def kill_every_worker():
        """Once a job is stored, every pool worker dies, those that replace them included."""
        NotifyingStore.first.wait()
        while not stop.is_set():
            try:
                for child in psutil.Process().children():
                    try:
                        if child.pid not in before and "spawn_main" in " ".join(child.cmdline()):
                            child.kill()
                    except psutil.NoSuchProcess:
                        pass
            except Exception as exc:  # seen by the test, not lost with the thread
                failures.append(repr(exc))
            stop.wait(0.005)

    killer = threading.Thread(target=kill_every_worker, daemon=True)
    killer.start()
    store = NotifyingStore(tmp_path / "jobs.jsonl", "ctx")
    try:
        with pytest.raises(ShedError) as failed:
            run_and_record(spec, JOBS, store, workers=2, executor="local", max_retries=1)
    finally:
        stop.set()
        NotifyingStore.first.set()
        killer.join()
        store.close()
    assert not failures
    kept = JobStore(tmp_path / "jobs.jsonl", "ctx")
    kept.close()
    assert kept.values and kept.values == {k: fault_free[k] for k in kept.values}
    message = str(failed.value)
    lost = [k for k in fault_free if f"job {k} lost its worker process 2 times" in message]
    assert lost and lost[0] not in kept.values and "\n" not in message
    assert message.startswith("shapley.max_retries=1: ") and f"the {len(kept.values)} jobs finished before" in message
