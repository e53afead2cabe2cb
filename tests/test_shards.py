"""Data-parallel record scoring (shed.shards): fixed shards, one model per worker, the same losses at any worker
count; a worker lost mid-shard costs that shard only; the forward valuation and sample's IFD on 1 and 2 workers
(processes, Ray) write the same bytes."""

import dataclasses

import numpy as np
import pytest
from helpers import tiny_random_lm

from shed import shards
from shed.config import LoraConfig, TrainConfig
from shed.losses import response_losses
from shed.synthetic import generate_pool

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TRAIN = TrainConfig(template="qa", batch_size=4, max_length=96, lora=LoraConfig(r=4, alpha=8))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A seeded tiny Llama saved as a model directory (workers load it by path)."""
    model, tokenizer = tiny_random_lm()
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def cluster(executor):
    """For executor ray, a local Ray cluster of 2 CPUs for the test (shut down after it)."""
    if executor != "ray":
        yield
        return
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def records():
    return generate_pool(40, 0.25, 0)[0]


def test_shards_cut_each_states_records_in_pool_order_at_a_fixed_size():
    rows = [{"id": str(i)} for i in range(5)]
    tasks = shards.tasks({"base": rows, "run-0000": rows[:2]}, 2)
    assert [t["key"] for t in tasks] == ["base.shard-000000", "base.shard-000001", "base.shard-000002",
                                         "run-0000.shard-000000"]
    assert [[r["id"] for r in t["records"]] for t in tasks] == [["0", "1"], ["2", "3"], ["4"], ["0", "1"]]
    assert {t["unconditional"] for t in tasks} == {False}
    assert shards.tasks({None: rows}, 8, unconditional=True)[0]["key"] == "model.alone.shard-000000"


def test_a_shards_losses_are_its_own_response_losses_in_whatever_order_shards_run(model_dir, records):
    spec = shards.ScoreSpec(model_dir, "cpu", "auto", TRAIN, 4, max_tokens=300)
    tasks = shards.tasks({None: records}, 16, unconditional=True)
    runner = spec.runner("cpu")
    results = {r["key"]: r for r in shards.score(spec, tasks, runner=runner)}
    backwards = {r["key"]: r for r in shards.score(spec, tasks[::-1], runner=runner)}
    assert {k: (r["ids"], r["losses"]) for k, r in results.items()} == \
        {k: (r["ids"], r["losses"]) for k, r in backwards.items()}
    for task in tasks:
        expected = response_losses(runner.model, runner.tokenizer, task["records"], "qa", 96, 4, unconditional=True,
                                   max_tokens=300)
        assert results[task["key"]]["losses"] == expected
        assert results[task["key"]]["ids"] == [r["id"] for r in task["records"]]


def test_forward_losses_scored_by_a_worker_of_its_own_are_the_fitting_trainers(model_dir, records):
    """forward's shards scored by another runner, which loads the model itself and gets each run's adapter as
    safetensors bytes (as a worker does), give the floats of scoring on the trainer that fitted the runs."""
    from safetensors.torch import save
    from test_record_valuation import Book

    from shed import forward
    from shed.models import load_causal_lm
    from shed.training import LoraTrainer

    model, tokenizer = load_causal_lm(model_dir, "cpu", "auto")
    trainer = LoraTrainer(model, tokenizer, dataclasses.replace(TRAIN, epochs=2, lr=0.01))
    dev = records[:8]

    def worker(tasks: list[dict], adapters: dict) -> list[dict]:
        spec = shards.ScoreSpec(model_dir, "cpu", "auto", trainer.cfg, 4, lora=True,
                                adapters={state: save(tensors) for state, tensors in adapters.items()})
        return list(shards.score(spec, tasks, runner=spec.runner("cpu")))

    here = forward.value_forward(trainer, records, dev, [0, 1], Book(), 4, chunk=16)
    there = forward.value_forward(trainer, records, dev, [0, 1], Book(), 4, chunk=16, score=worker)
    assert np.array_equal(here[0], there[0]) and np.array_equal(here[1], there[1])
    assert not np.array_equal(here[1][0], here[0]) and not np.array_equal(here[1][0], here[1][1])


# --- a lost worker: the shard it held is scored again, with the same losses --------------------------------------

@pytest.mark.slow  # pools of spawned workers, or a local Ray cluster, importing torch (~20-40 s)
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_worker_killed_mid_shard_costs_only_that_shard_which_scores_the_same(model_dir, records, executor, cluster,
                                                                              caplog):
    import logging
    import os
    import signal

    caplog.set_level(logging.WARNING, logger="shed.executors")
    spec = shards.ScoreSpec(model_dir, "cpu", "auto", TRAIN, 4)
    tasks = shards.tasks({None: records}, 4)  # 10 shards
    reference = {r["key"]: r["losses"] for r in shards.score(spec, tasks, runner=spec.runner("cpu"))}
    losses, killed = {}, None
    for result in shards.score(spec, tasks, workers=2, executor=executor, max_retries=2):
        if killed is None:  # its worker has already taken its next shard: kill it mid-shard
            killed, first = result["pid"], result["key"]
            os.kill(killed, signal.SIGKILL)
        assert result["key"] not in losses  # a finished shard is never scored again
        losses[result["key"]] = result["losses"]
    assert losses == reference
    named = [r.getMessage() for r in caplog.records if r.name == "shed.executors" and r.levelno == logging.WARNING
             and any(k in r.getMessage() for k in reference if k != first)]
    assert len(named) == 1 and (f"worker process {killed} killed by SIGKILL" in named[0]
                                or f"(process {killed} died)" in named[0])



@pytest.mark.slow  # a local Ray cluster, two actors importing torch (~15 s)
@pytest.mark.parametrize("executor", ["ray"])
def test_a_shard_whose_actor_dies_past_max_retries_fails_in_one_line_naming_it(model_dir, records, executor, cluster):
    import os
    import signal

    from shed.fileio import ShedError

    spec = shards.ScoreSpec(model_dir, "cpu", "auto", TRAIN, 4)
    tasks = shards.tasks({None: records}, 4)
    done = []
    with pytest.raises(ShedError) as failed:
        for result in shards.score(spec, tasks, workers=2, executor=executor, max_retries=0):
            if not done:
                os.kill(result["pid"], signal.SIGKILL)  # its actor holds its next shard; Ray may not restart it
            done.append(result["key"])
    message = str(failed.value)
    lost = [t["key"] for t in tasks if f"job {t['key']} lost its Ray actor" in message]
    assert lost and lost[0] not in done and "\n" not in message
    assert message.startswith("shapley.max_retries=0: ") and f"the {len(done)} jobs finished before" in message


# --- the stages: forward valuation and sample on 1 and 2 workers ----------------------------------------------------

def stage_params(ws, **shapley) -> None:
    """The tiny stage params with every record valued by forward (k = 2), record losses in 4 shards of 64, and
    sample by IFD (scored by the sample stage; its conditional losses are the forward valuation's base losses)."""
    import yaml
    from helpers import write_stage_params

    write_stage_params(ws, method="forward", players="records", k=2, shard_records=64, **shapley)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["sample"].update(method="ifd", subset_size=0.25)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


OUTPUTS = ["data/shapley/scores.csv", "data/shapley/record_scores.csv", "data/curated/records.jsonl"]


@pytest.fixture(scope="module")
def one_worker(shapley_inputs, tmp_path_factory):
    """shapley (forward over every record) and sample (IFD) with one worker, in the stage's process."""
    import shutil

    from helpers import run_stage

    ws = tmp_path_factory.mktemp("one-worker") / "ws"
    shutil.copytree(shapley_inputs, ws)
    stage_params(ws)
    run_stage(ws, "shapley")
    run_stage(ws, "sample")
    return ws


@pytest.mark.slow  # 2-3 stage processes, each with its workers importing torch (~75 s)
# Processes only: Ray's shards give the one-worker floats in test_a_worker_killed_mid_shard_...[ray], and the stage
# reaches either executor through the same `shards.score` (a Ray stage run here would add ~75 s to CI).
@pytest.mark.parametrize("executor", ["local"])
def test_forward_and_sample_on_two_workers_write_one_workers_bytes(one_worker, shapley_inputs, tmp_path, executor):
    import shutil

    from helpers import run_stage, shapley_metrics

    ws = tmp_path / "ws"
    shutil.copytree(shapley_inputs, ws)
    stage_params(ws, workers=2, executor=executor)
    run_stage(ws, "shapley")
    run_stage(ws, "sample")
    for path in OUTPUTS:
        assert (ws / path).read_bytes() == (one_worker / path).read_bytes(), path
    pool = len((ws / "data/prepared/pool.jsonl").read_text().splitlines())
    assert shapley_metrics(ws)["losses_computed"] == shapley_metrics(one_worker)["losses_computed"] == 3 * pool
    if executor == "local":  # a lost shard (as a kill leaves it) is the only one scored again
        chunks = sorted((ws / "data/shapley_jobs/forward").glob("*/run-0001.chunk-*.json"))
        next(c for c in chunks if len(c.with_suffix(".ids.txt").read_text().split()) == 64).unlink()
        run_stage(ws, "shapley")
        assert shapley_metrics(ws)["losses_computed"] == 64
        assert (ws / OUTPUTS[1]).read_bytes() == (one_worker / OUTPUTS[1]).read_bytes()
