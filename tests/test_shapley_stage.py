"""The shapley stage as a process: crash-safe resume, reuse on raising k, parallel executors."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import kill_stage_when, run_stage
from helpers import shapley_metrics as metrics
from helpers import write_stage_params as set_params

from shed.shapley import schedule

pytestmark = pytest.mark.slow  # each case starts the stage 2-3 times (~10 s of imports each)


def job_lines(ws: Path) -> list[str]:
    path = ws / "data/shapley_jobs/jobs.jsonl"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def workspace(shapley_inputs, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(shapley_inputs, ws)
    return ws


def test_sigkill_mid_run_then_rerun_gives_identical_scores_and_reuses_finished_jobs(workspace, tmp_path):
    slow = {"k": 3, "n": 1, "epochs": 15}  # jobs slow enough for the kill to land mid-run
    reference = tmp_path / "reference"
    shutil.copytree(workspace, reference)
    set_params(reference, **slow)
    run_stage(reference, "shapley")

    set_params(workspace, **slow)
    kill_stage_when(workspace, lambda: len(job_lines(workspace)) >= 3, timeout=120)
    finished = len([line for line in job_lines(workspace) if line.endswith("}")])
    total = metrics(reference)["jobs"]
    assert 3 <= finished < total, "the kill must land mid-run"

    run_stage(workspace, "shapley")
    assert (workspace / "data/shapley/scores.csv").read_bytes() == (reference / "data/shapley/scores.csv").read_bytes()
    assert metrics(workspace)["jobs_reused"] == finished
    assert metrics(workspace)["jobs_run"] == total - finished
    keys = [json.loads(line)["key"] for line in job_lines(workspace)]
    assert len(keys) == len(set(keys)) == total
    print(f"SIGKILL after {finished} of {total} jobs: rerun reused {finished}, ran {total - finished}, "
          "scores.csv byte-identical to an uninterrupted run")


def test_raising_k_reuses_every_earlier_evaluation_and_runs_only_new_jobs(workspace):
    set_params(workspace, k=2, n=2)
    run_stage(workspace, "shapley")
    first = metrics(workspace)
    set_params(workspace, k=4, n=2)
    run_stage(workspace, "shapley")
    second = metrics(workspace)
    players = list(range(8))
    assert first["jobs"] == len(schedule("group_permutation", players, 2, 2))
    assert second["jobs_reused"] == first["jobs"]
    assert second["jobs_run"] == len(schedule("group_permutation", players, 4, 2)) - first["jobs"]
    assert second["seconds_overhead"] >= 0
    # The valuation's curve: each job's dev value and subset size, in the estimator's order.
    subsets = [json.loads(line) for line in (workspace / "data/shapley/subsets.jsonl").read_text().splitlines()]
    curves = workspace / "dvclive/shapley/plots/metrics"
    values = [line.split("\t") for line in (curves / "value.tsv").read_text().splitlines()[1:]]
    sizes = [line.split("\t") for line in (curves / "size.tsv").read_text().splitlines()[1:]]
    assert [int(s) for s, _ in values] == list(range(len(subsets)))
    assert [float(v) for _, v in values] == pytest.approx([s["value"] for s in subsets])
    assert [int(float(v)) for _, v in sizes] == [s["size"] for s in subsets]


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_parallel_workers_give_the_same_scores_as_one(workspace, tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    serial = tmp_path / "serial"
    shutil.copytree(workspace, serial)
    set_params(serial, k=2, n=2, estimator="regression")
    run_stage(serial, "shapley")
    set_params(workspace, k=2, n=2, estimator="regression", workers=2, executor=executor)
    run_stage(workspace, "shapley")
    assert (workspace / "data/shapley/scores.csv").read_bytes() == (serial / "data/shapley/scores.csv").read_bytes()
    assert metrics(workspace)["workers"] == 2 and metrics(workspace)["executor"] == executor


def test_local_games_reuse_the_jobs_and_over_every_question_are_the_single_game(workspace):
    """dev_neighbours changes how the recorded per-question scores are read, not which jobs run;
    with every dev question as each proxy's neighbours (choice_logprob: a plain mean over
    questions) it is the paper's single game."""
    set_params(workspace, k=2, n=1, value="choice_logprob", dev_neighbours=0)
    run_stage(workspace, "shapley")
    single = (workspace / "data/shapley/scores.csv").read_text().splitlines()
    jobs = [json.loads(line) for line in job_lines(workspace)]
    dev_size = len((workspace / "data/prepared/dev.jsonl").read_text().splitlines())
    assert jobs and all(len(job["questions"]) == dev_size for job in jobs)
    assert all(job["value"] == pytest.approx(sum(job["questions"]) / dev_size, abs=1e-12) for job in jobs)

    set_params(workspace, k=2, n=1, value="choice_logprob", dev_neighbours=dev_size)
    run_stage(workspace, "shapley")
    assert metrics(workspace)["jobs_run"] == 0 and metrics(workspace)["dev_neighbours"] == dev_size
    every = (workspace / "data/shapley/scores.csv").read_text().splitlines()
    assert every[0] == single[0]
    for a, b in zip(single[1:], every[1:]):
        cluster_a, proxy_a, size_a, score_a, stderr_a, credits_a = a.split(",")
        cluster_b, proxy_b, size_b, score_b, stderr_b, credits_b = b.split(",")
        assert (cluster_a, proxy_a, size_a, credits_a) == (cluster_b, proxy_b, size_b, credits_b)
        assert float(score_a) == pytest.approx(float(score_b), abs=1e-9)
        assert float(stderr_a) == pytest.approx(float(stderr_b), abs=1e-9)

    set_params(workspace, k=2, n=1, value="choice_logprob", dev_neighbours=3)
    run_stage(workspace, "shapley")
    assert metrics(workspace)["jobs_run"] == 0
    assert (workspace / "data/shapley/scores.csv").read_text().splitlines() != every


def test_more_neighbours_than_dev_questions_is_a_clear_error(workspace):
    set_params(workspace, dev_neighbours=10_000)
    result = run_stage(workspace, "shapley", ok=False)
    assert result.returncode != 0
    assert "shapley.dev_neighbours: 10000 is more than the" in result.stderr
    assert "Traceback" not in result.stderr


def test_job_store_keeps_per_question_scores_and_knows_which_jobs_lack_them(tmp_path):
    from shed.jobstore import JobStore

    path = tmp_path / "jobs.jsonl"
    store = JobStore(path, "ctx")
    store.put("a", 1.0, [0.5, 1.5], size=2)
    store.close()
    with path.open("a") as fh:  # a job recorded before per-question scores were kept: rerun for local games
        fh.write(json.dumps({"context": "ctx", "key": "b", "value": 2.0}) + "\n")
    again = JobStore(path, "ctx")
    again.close()
    assert again.values == {"a": 1.0, "b": 2.0} and again.questions == {"a": [0.5, 1.5]}
