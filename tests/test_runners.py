"""The record-level methods' runners (shed.inrun_runner, shed.forward_runner): a model loaded once from disk, then
the work given, yielding what the algorithms they wrap compute, with the caller's checkpoints and curves."""

import numpy as np
import pytest
from helpers import tiny_llama
from test_inrun_stage import PLAYERS, QUESTIONS, RECORDS, TRAIN
from test_record_valuation import DEV, Book
from test_trainer import Kept, Killed

from shed import forward, inrun
from shed.config import ShapleyConfig
from shed.forward_runner import ForwardRunner
from shed.inrun_runner import InRunRunner

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as shapley.model names a local model."""
    model, tokenizer = tiny_llama(RECORDS, QUESTIONS + [q for q in DEV if "question" in q])
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


class Steps:
    """A loss-curve callback noting (run, step) of each step it sees, live or restored."""

    def __init__(self, run: int, seen: list):
        self.run, self.seen = run, seen

    def before_step(self, step, batches, lr):
        pass

    def after_step(self, step, loss, lr):
        self.seen.append((self.run, step))

    def resumed(self, losses):
        self.seen.extend((self.run, step) for step in range(len(losses)))


def test_the_inrun_runner_yields_each_run_as_it_finishes_with_the_credits_of_value_runs(model_dir):
    cfg = ShapleyConfig(model=str(model_dir), method="inrun", device="cpu", dtype="float32", direction="adam")
    runner = InRunRunner(cfg, TRAIN, QUESTIONS, None, RECORDS, PLAYERS)
    assert (runner.device, runner.steps) == ("cpu", 6) and runner.setup_seconds > 0
    assert runner.weights == pytest.approx(inrun.token_weights(runner.dev_batch)) and runner.weights.sum() == 1
    seen = []
    got = list(runner.run([1, 0], curves=lambda run: Steps(run, seen)))
    assert [summary.run for summary, _ in got] == [1, 0]
    assert seen == [(run, step) for run in (1, 0) for step in range(6)]  # each run's curve, step by step
    # Both runs in one accumulator by the algorithm itself, on the runner's trainer and dev batch: the same credits.
    both = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=2)
    inrun.value_runs(runner.trainer, RECORDS, PLAYERS, runner.dev_batch, both, [0, 1], direction="adam")
    for summary, one in got:
        assert one.runs == 1 and one.players == PLAYERS and summary.steps == 6
        assert np.array_equal(one.totals[0], both.totals[summary.run]) and one.steps[0] == 6
    assert not np.allclose(got[0][1].totals, got[1][1].totals)


def test_a_run_killed_in_one_inrun_runner_resumes_in_another_from_its_checkpoint(model_dir):
    """Runs may be split between runners: run 1 killed after step 2 in one runner, resumed from its checkpoint by
    a second runner (its own model load), gives the credits of run 1 run whole in a third."""
    cfg = ShapleyConfig(model=str(model_dir), method="inrun", device="cpu", dtype="float32")

    def runner() -> InRunRunner:
        return InRunRunner(cfg, TRAIN, QUESTIONS, None, RECORDS, PLAYERS)

    kept = Kept(stop_at=2)
    with pytest.raises(Killed):
        next(runner().run([1], checkpoints=lambda run: kept))
    seen = []
    ((summary, resumed),) = runner().run([1], checkpoints=lambda run: Kept(state=kept.state),
                                         curves=lambda run: Steps(run, seen))
    assert summary.resumed_from == 2 and seen == [(1, step) for step in range(6)]  # restored steps, then live ones
    ((_, whole),) = runner().run([1])
    assert np.array_equal(resumed.totals, whole.totals) and np.array_equal(resumed.steps, whole.steps)


def test_the_forward_runner_yields_the_base_losses_then_each_runs_and_keeps_them_in_the_book(model_dir):
    cfg = ShapleyConfig(model=str(model_dir), method="forward", device="cpu", dtype="float32", dev_epochs=2)
    runner = ForwardRunner(cfg, TRAIN, DEV, None)
    assert runner.recipe.epochs == 2 and runner.dev_records == forward.dev_as_records(DEV)
    book = Book()
    assert runner.needed(RECORDS, book, [0, 1]) == 3 * len(RECORDS)
    seen = []
    states = list(runner.run(RECORDS, [0, 1], book, curves=lambda run: Steps(run, seen)))
    assert [None if summary is None else summary.run for summary, _ in states] == [None, 0, 1]
    assert sorted({run for run, _ in seen}) == [0, 1]  # each run's dev fit, on its curve
    base, tuned, summaries = forward.value_forward(runner.trainer, RECORDS, runner.dev_records, [0, 1], Book(),
                                                   TRAIN.micro_batch, max_tokens=cfg.chunk_tokens)
    assert np.array_equal(states[0][1], base) and np.array_equal(np.stack([s[1] for s in states[1:]]), tuned)
    def fit(s):
        return s.run, s.seed, s.dev_before, s.dev_after, s.train_loss, s.losses

    assert [fit(s) for s, _ in states[1:]] == [fit(s) for s in summaries]
    # All of it is in the book now: a second pass computes nothing and yields the same losses.
    assert runner.needed(RECORDS, book, [0, 1]) == 0
    book.added.clear()
    again = list(runner.run(RECORDS, [0, 1], book))
    assert not book.added and all(np.array_equal(a[1], b[1]) for a, b in zip(again, states))
