"""shapley.method inrun: the driver (shed.inrun.value_runs, CreditCallback) against plain autograd, and
the stage as a process: the retrain contract's outputs, determinism, SIGKILL then resume."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    ROOT,
    kill_stage_when,
    run_stage,
    tiny_float64_trainer,
    write_stage_params,
)
from helpers import shapley_metrics as metrics

from shed import inrun
from shed.config import LoraConfig, TrainConfig, load_params
from shed.fileio import ShedError
from shed.training import pad_rows

RECORDS = [
    {"id": f"r{i}", "instruction": f"Name a {kind}.", "input": "", "output": answer}
    for i, (kind, answer) in enumerate([("colour", "red"), ("animal", "dog cat"), ("number", "three"),
                                        ("fruit", "plum"), ("colour", "blue green")])
]
QUESTIONS = [
    {"question": "Name a colour.", "choices": ["red", "dog", "three"], "answer": 0},
    {"question": "Name an animal.", "choices": ["plum", "bird"], "answer": 1},
    {"question": "Name a fruit.", "choices": ["apple pear", "two"], "answer": 0},
]
# 5 records in batches of 2: 3 steps an epoch (the last of one record), 2 epochs; a clipping norm
# that some steps exceed and some do not; warmup then decay: every step has its own lr.
TRAIN = TrainConfig(template="qa", batch_size=2, epochs=2, lr=0.02, max_grad_norm=3.0, max_length=64,
                    lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
PLAYERS = [10, 11, 12, 13, 14]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trainer():
    """A LoRA trainer on a 2-layer float64 Llama (float64: the reference sums agree to 1e-9)."""
    return tiny_float64_trainer(RECORDS, QUESTIONS, TRAIN)


@pytest.fixture(scope="module")
def dev(trainer):
    return pad_rows(inrun.dev_rows(trainer.tokenizer, QUESTIONS), trainer.tokenizer.pad_token_id)


def flat_grad(model, loss) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [p for _, p in inrun.lora_parameters(model)])])


def row_nll(model, ids, labels) -> torch.Tensor:
    """Summed next-token NLL of one unpadded row, by hand."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(labels[1:])
    keep = target != -100
    return -torch.log_softmax(logits, -1)[keep].gather(1, target[keep, None]).sum()


class Reference:
    """Records, before each step, the first-order term of the step by plain autograd, one example and
    one question at a time: lr · clip · ⟨∇ℓ_i, ∇ℓ(q)⟩ per example i and question q."""

    def __init__(self, trainer, players):
        self.trainer, self.players = trainer, players
        self.terms, self.clipped = [], []
        self.examples, self.questions = [], []  # per step: lr · clip · ∇ℓ_i, and ∇ℓ(q)

    def before_step(self, step, batches, lr):
        model = self.trainer.model
        (batch,) = batches
        keep = batch["attention_mask"].bool()
        rows = [(batch["input_ids"][i][keep[i]].tolist(), batch["labels"][i][keep[i]].tolist())
                for i in range(len(batch["input_ids"]))]
        total = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in rows)
        per_example = torch.stack([flat_grad(model, row_nll(model, ids, lab) / total) for ids, lab in rows])
        dev_rows = inrun.dev_rows(self.trainer.tokenizer, QUESTIONS)
        per_question = torch.stack([flat_grad(model, row_nll(model, ids, lab) / sum(x != -100 for x in lab[1:]))
                                    for ids, lab in dev_rows])
        norm = float(per_example.sum(0).norm())
        clip = min(1.0, TRAIN.max_grad_norm / (norm + 1e-6))
        self.clipped.append(clip < 1)
        self.terms.append((lr * clip * (per_example @ per_question.T)).numpy())
        self.examples.append(lr * clip * per_example)
        self.questions.append(per_question)

    def after_step(self, step, loss, lr):
        pass


class Both:
    """Several callbacks as one; before_step hands the trainer the first step gradient one of them returns."""

    def __init__(self, *callbacks):
        self.callbacks = callbacks

    def before_step(self, *args):
        given = [c.before_step(*args) for c in self.callbacks]
        return next((g for g in given if g is not None), None)

    def after_step(self, *args):
        for c in self.callbacks:
            c.after_step(*args)


def test_a_runs_credits_add_up_to_the_sum_of_its_steps_first_order_terms(trainer, dev, monkeypatch):
    reference = Reference(trainer, PLAYERS)
    fit = trainer.fit
    monkeypatch.setattr(trainer, "fit", lambda records, seed, progress=None, callback=None, **kw:
                        fit(records, seed, progress, Both(reference, callback), **kw))
    credits = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=1)
    (summary,) = inrun.value_runs(trainer, RECORDS, PLAYERS, dev, credits, [0])
    assert summary.steps == len(reference.terms) == 6 and credits.steps[0] == 6
    assert any(reference.clipped) and not all(reference.clipped)  # both kinds of step are credited
    # The run's credits, all players together, are the sum over its steps of each step's first-order term.
    steps_total = sum(term.sum(0) for term in reference.terms)
    assert np.allclose(credits.totals[0].sum(0), steps_total, rtol=1e-9, atol=1e-15)
    assert np.allclose(summary.first_order, steps_total, rtol=1e-9, atol=1e-15)
    assert np.abs(steps_total).max() > 1e-6
    # And each player's own: its rows' terms over the steps whose batch holds it (from the trainer's schedule).
    expected = np.zeros((len(PLAYERS), len(QUESTIONS)))
    for term, (rows,) in zip(reference.terms, trainer.schedule(RECORDS, inrun.run_seed(TRAIN.seed, 0))):
        for row, i in enumerate(rows):
            expected[i] += term[row]
    assert np.allclose(credits.totals[0], expected, rtol=1e-9, atol=1e-15)
    # The dev losses before and after the run are the model's (run 0 starts from the fresh adapter, B = 0).
    assert np.allclose(summary.dev_after, inrun.dev_losses(trainer.model, dev), rtol=1e-12)
    assert not np.allclose(summary.dev_before, summary.dev_after)


def test_the_adam_direction_credits_the_first_step_with_adams_own_update(trainer, dev, monkeypatch):
    """At the first step Adam's update is -lr · g/(|g| + ε) (m̂ = g, v̂ = g², g the clipped gradient): the
    adam direction's credits of that step add up to the first-order change along the update actually made."""
    named = inrun.lora_parameters(trainer.model)
    seen = {}

    class Watch:
        def before_step(self, step, batches, lr):
            if step == 0:
                seen["before"] = torch.cat([p.detach().flatten() for _, p in named])
                seen["dev"] = inrun.per_example_grads(trainer.model, dev, "example").flat()

        def after_step(self, step, loss, lr):
            if step == 0:
                seen["after"] = torch.cat([p.detach().flatten() for _, p in named])
                seen["credits"] = credits.totals[0].sum(0).copy()

    fit = trainer.fit
    monkeypatch.setattr(trainer, "fit", lambda records, seed, progress=None, callback=None, **kw:
                        fit(records, seed, progress, Both(callback, Watch()), **kw))
    credits = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=1)
    inrun.value_runs(trainer, RECORDS, PLAYERS, dev, credits, [0], direction="adam")
    change = (seen["dev"] @ (seen["before"] - seen["after"])).numpy()  # the first-order drop of each loss
    assert np.abs(change).max() > 1e-4
    assert np.allclose(seen["credits"], change, rtol=1e-4, atol=1e-4 * np.abs(change).max())
    sgd = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=1)
    inrun.value_runs(trainer, RECORDS, PLAYERS, dev, sgd, [0])
    assert not np.allclose(sgd.totals, credits.totals)
    with pytest.raises(ValueError, match="direction"):
        inrun.value_runs(trainer, RECORDS, PLAYERS, dev, sgd, [0], direction="lion")


def test_micro_batches_are_weighted_by_their_share_of_the_steps_label_tokens(trainer, dev):
    """With accumulation the step's loss is the mean over all its label tokens: split into micro-batches of
    unequal token counts, a step gets the same credits as in one batch."""
    model = trainer.model
    trainer.reset(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4), dtype=p.dtype) * 0.3)
    rows = [trainer.encode(r) for r in RECORDS[:4]]
    whole, split = trainer._batch(rows), [trainer._batch(rows[:1]), trainer._batch(rows[1:])]
    assert len({int(inrun.response_tokens(b).sum()) for b in split}) == 2

    def credited(batches, players):
        acc = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=1)
        callback = inrun.CreditCallback(model, dev, acc, 0, [players], max_grad_norm=0.05)
        callback.before_step(0, batches, 0.1)
        return acc, callback

    one, _ = credited([whole], [PLAYERS[:4]])
    two, two_cb = credited(split, [PLAYERS[:1], PLAYERS[1:4]])
    assert one.steps[0] == two.steps[0] == 1  # one step, however many micro-batches
    # Equal but for the float32 RMSNorm inside the float64 model, which sees other padding widths.
    scale = np.abs(one.totals).max()
    assert scale > 0 and np.allclose(one.totals, two.totals, rtol=0, atol=1e-6 * scale)
    # after_step: the trainer's loss is that token-weighted one; a mean of micro-batch means is not.
    hf = float(model(**whole).loss)
    two_cb.after_step(0, hf, 0.1)
    assert two_cb.loss_mismatch is None
    two, two_cb = credited(split, [PLAYERS[:1], PLAYERS[1:4]])
    two_cb.after_step(0, float(sum(model(**b).loss for b in split)), 0.1)
    assert two_cb.loss_mismatch is not None


def test_a_batch_that_is_not_the_schedules_is_refused(trainer, dev):
    rows = [trainer.encode(r) for r in RECORDS[:2]]
    acc = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=1)
    callback = inrun.CreditCallback(trainer.model, dev, acc, 0, [[PLAYERS[:2]]], 1.0,
                                    step_rows=[[[rows[1][0], rows[0][0]]]])  # the schedule's rows swapped
    with pytest.raises(RuntimeError, match="not the record"):
        callback.before_step(0, [trainer._batch(rows)], 0.1)
    with pytest.raises(RuntimeError, match="schedule"):
        callback.before_step(0, [trainer._batch(rows[:1])], 0.1)
    assert acc.steps[0] == 0


def test_a_run_depends_on_its_index_alone(trainer, dev):
    """Run 1 done after run 0, or alone in a fresh process's accumulator: the same credits, bit for bit
    (what lets a rerun skip finished runs)."""
    both = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=2)
    summaries = inrun.value_runs(trainer, RECORDS, PLAYERS, dev, both, [0, 1])
    assert [s.seed for s in summaries] == [TRAIN.seed, TRAIN.seed + 1]
    alone = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=2)
    inrun.value_runs(trainer, RECORDS, PLAYERS, dev, alone, [1])
    assert np.array_equal(alone.totals[1], both.totals[1]) and not alone.totals[0].any()
    assert not np.allclose(both.totals[0], both.totals[1])  # another data order and init: other credits
    back = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=2)
    back.put_run(1, both.run_slice(1))
    assert np.array_equal(back.totals, alone.totals) and np.array_equal(back.steps, alone.steps)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in inrun.lora_parameters(model)}


def test_a_warm_up_fit_starts_the_credited_run_from_a_model_that_is_learning(trainer, dev):
    """warmup 0.4: 2 of the 5 records, a seeded sample per run, fit first and not credited; the credited run trains on
    from that adapter (its dev losses before are the warmed-up model's, not the base's) and ends where a plain warm-up
    fit followed by a fit without reset ends. Every record is still credited; the same run twice, bit for bit."""
    seed = inrun.run_seed(TRAIN.seed, 0)
    warm = inrun.warmup_records(RECORDS, 0.4, seed)
    assert len(warm) == 2 and warm == inrun.warmup_records(RECORDS, 0.4, seed)
    assert warm != inrun.warmup_records(RECORDS, 0.4, seed + 1) and inrun.warmup_records(RECORDS, 0.0, seed) == []
    trainer.reset(seed)
    base = inrun.dev_losses(trainer.model, dev)
    trainer.fit(warm, seed=seed)
    warmed = inrun.dev_losses(trainer.model, dev)
    trainer.fit(RECORDS, seed=seed, reset=False)
    plain = lora_state(trainer.model)

    runs = []
    for _ in range(2):
        credits = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=1)
        (summary,) = inrun.value_runs(trainer, RECORDS, PLAYERS, dev, credits, [0], warmup=0.4)
        runs.append((credits, summary, lora_state(trainer.model)))
    (credits, summary, adapter), (again, _, _) = runs
    assert np.array_equal(credits.totals, again.totals)
    assert np.allclose(summary.dev_before, warmed, rtol=1e-12) and not np.allclose(summary.dev_before, base)
    scale = max(float(v.abs().max()) for v in plain.values())
    assert all(torch.allclose(adapter[n], plain[n], rtol=0, atol=1e-6 * scale) for n in plain)
    assert summary.steps == 6 and np.abs(credits.totals[0]).sum(1).min() > 0  # every record credited
    cold = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=1)
    inrun.value_runs(trainer, RECORDS, PLAYERS, dev, cold, [0])
    assert not np.allclose(cold.totals, credits.totals)


def test_a_credited_fit_takes_one_pass_per_step_and_trains_the_plain_fits_adapter(trainer, dev, monkeypatch):
    """The credit pass's per-example gradients sum to the step's gradient, which the trainer applies instead
    of its own backward: the adapter is the plain fit's up to float32 rounding (Hugging Face's loss takes
    the logits in float32; the credit pass in the model's float64)."""
    trainer.fit(RECORDS, seed=0)
    plain = lora_state(trainer.model)
    passes = []
    backward = trainer.backward
    monkeypatch.setattr(trainer, "backward", lambda *a, **kw: passes.append(1) or backward(*a, **kw))
    credits = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=1)
    (summary,) = inrun.value_runs(trainer, RECORDS, PLAYERS, dev, credits, [0])
    assert passes == [] and summary.steps == 6  # no step ran the trainer's own forward/backward
    credited = lora_state(trainer.model)
    scale = max(float(v.abs().max()) for v in plain.values())
    assert all(torch.allclose(credited[n], plain[n], rtol=0, atol=1e-6 * scale) for n in plain)
    # A callback returning nothing leaves every step to the trainer: the plain fit, bit for bit.
    trainer.fit(RECORDS, seed=0, callback=Both())
    assert len(passes) == 6 and all(torch.equal(v, plain[n]) for n, v in lora_state(trainer.model).items())


@pytest.mark.parametrize("direction, dev_every, stop_at, warmup", [("sgd", 1, 2, 0.0), ("adam", 1, 3, 0.0),
                                                                     ("sgd", 4, 3, 0.0), ("sgd", 4, 4, 0.0),
                                                                     ("sgd", 4, 3, 0.4)])
def test_a_run_killed_mid_run_resumes_from_its_checkpoint_bit_for_bit(trainer, dev, direction, dev_every, stop_at,
                                                                     warmup, tmp_path):
    """value_runs killed after `stop_at` of run 1's 6 steps, resumed by a fresh trainer and accumulator from the
    saved state (through safetensors and JSON): the uninterrupted run's credits, summary, adapter and loss curve,
    bit for bit. dev_every 4 stopped at 3 carries the held dev gradients; stopped at 4 it need not (step 4
    refreshes); with a warm-up the resumed run redoes it and the checkpoint's adapter replaces it."""
    from test_trainer import Kept, Killed

    from shed import curves

    def curve(name: str) -> Path:
        return tmp_path / name / "plots/metrics"

    whole = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=2)
    with curves.live_steps(str(curve("whole"))) as live:
        (expected,) = inrun.value_runs(trainer, RECORDS, PLAYERS, dev, whole, [1], direction=direction,
                                       dev_every=dev_every, warmup=warmup, curves=lambda run: curves.StepCurve(live, f"run-{run}/"))
    adapter = lora_state(trainer.model)

    kept = Kept(stop_at=stop_at)
    killed = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=2)
    with pytest.raises(Killed):
        inrun.value_runs(trainer, RECORDS, PLAYERS, dev, killed, [1], direction=direction, dev_every=dev_every,
                         warmup=warmup, checkpoints=lambda run: kept)
    held = any(k.startswith("callback/dev_grads/") for k in kept.state["tensors"])
    assert held == (dev_every > 1 and stop_at % dev_every != 0)

    torch.manual_seed(99)
    fresh = copy.deepcopy(trainer)
    resumed = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=2)
    with curves.live_steps(str(curve("resumed"))) as live:
        (summary,) = inrun.value_runs(fresh, RECORDS, PLAYERS, dev, resumed, [1], direction=direction,
                                      dev_every=dev_every, warmup=warmup, checkpoints=lambda run: Kept(state=kept.state),
                                      curves=lambda run: curves.StepCurve(live, f"run-{run}/", lr=False))
    # The restored steps' rows first, then the live ones: the uninterrupted run's loss curve.
    loss = (curve("resumed") / "run-1/loss.tsv").read_text()
    assert loss == (curve("whole") / "run-1/loss.tsv").read_text() and len(loss.splitlines()) == 1 + 6
    assert not (curve("resumed") / "run-1/lr.tsv").exists()
    assert summary.resumed_from == stop_at and expected.resumed_from == 0
    assert np.array_equal(resumed.totals, whole.totals) and np.array_equal(resumed.steps, whole.steps)
    for field in ("dev_before", "dev_after", "first_order"):
        assert np.array_equal(getattr(summary, field), getattr(expected, field)), field
    assert summary.train_loss == expected.train_loss and summary.steps == expected.steps
    assert all(torch.equal(v, adapter[n]) for n, v in lora_state(fresh.model).items())


def test_dev_every_reuses_the_dev_gradients_of_its_last_refresh(trainer, dev, monkeypatch):
    """dev_every 3 over 6 steps: steps 0 and 3 take the dev gradients afresh (the credits of dev_every 1),
    steps 1, 2, 4, 5 contract their own training gradients with the dev gradients held since (by plain
    autograd: lr · clip · ⟨∇ℓ_i(θ_t), ∇ℓ(q; θ_refresh)⟩); the training itself does not depend on it."""
    reference = Reference(trainer, PLAYERS)
    fit = trainer.fit
    monkeypatch.setattr(trainer, "fit", lambda records, seed, progress=None, callback=None, **kw:
                        fit(records, seed, progress, Both(reference, callback), **kw))

    def per_step(dev_every: int) -> tuple[list[np.ndarray], dict]:
        acc = inrun.InRunCredits(PLAYERS, len(QUESTIONS), runs=1)
        seen = []
        add = acc.add
        monkeypatch.setattr(acc, "add", lambda run, who, c: seen.append(c.copy()) or add(run, who, c))
        inrun.value_runs(trainer, RECORDS, PLAYERS, dev, acc, [0], dev_every=dev_every)
        return seen, lora_state(trainer.model)

    every, adapter = per_step(1)
    reference.examples, reference.questions = [], []
    held, held_adapter = per_step(3)
    assert len(held) == len(reference.examples) == 6
    assert all(torch.equal(held_adapter[n], adapter[n]) for n in adapter)
    for step, (a, b) in enumerate(zip(every, held)):
        scale = np.abs(a).max()
        assert scale > 0
        assert np.allclose(a, b, rtol=0, atol=1e-12 * scale) == (step % 3 == 0), step
        refreshed = step - step % 3
        expected = (reference.examples[step] @ reference.questions[refreshed].T).numpy()
        assert np.allclose(b, expected, rtol=1e-9, atol=1e-12 * scale), step
    with pytest.raises(ValueError, match="dev_every"):
        inrun.CreditCallback(trainer.model, dev, inrun.InRunCredits(PLAYERS, 3, 1), 0, [], 1.0, dev_every=0)


def test_the_run_stores_mid_run_state_is_used_only_whole_and_in_its_own_context(tmp_path, caplog):
    from shed.runstore import RunStore

    state = {"tensors": {"adapter/w": torch.arange(6.0).reshape(2, 3), "rng/cpu": torch.get_rng_state()},
             "meta": {"step": 3, "seed": 1}}
    store = RunStore(tmp_path, "aaaa")
    assert store.load_partial(0) is None
    store.save_partial(0, state)
    store.save_partial(0, {**state, "meta": {"step": 4, "seed": 1}})
    assert [p.name for p in sorted(store.dir.glob("run-0000.partial.*"))] == [
        "run-0000.partial.000004.safetensors", "run-0000.partial.json"]  # the older tensors went
    back = store.load_partial(0)
    assert back["meta"] == {"step": 4, "seed": 1}
    assert torch.equal(back["tensors"]["adapter/w"], state["tensors"]["adapter/w"])
    assert store.load_partial(1) is None
    # Copied into another context's folder it is not used; nor with its tensors damaged.
    other = RunStore(tmp_path, "bbbb")
    for path in store.dir.glob("run-0000.partial.*"):
        shutil.copy(path, other.dir / path.name)
    assert other.load_partial(0) is None and "another context" in caplog.text
    tensors = store.dir / "run-0000.partial.000004.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-4])
    assert store.load_partial(0) is None and "sha256" in caplog.text
    store.drop_partial(0)
    assert not list(store.dir.glob("run-0000.partial*"))


def test_inrun_takes_only_the_loglik_value(tmp_path):
    for value in ("choice_logprob", "accuracy"):
        path = tmp_path / "params.yaml"
        path.write_text(f"shapley:\n  method: inrun\n  value: {value}\n  dev_neighbours: 0\n")
        with pytest.raises(ShedError, match=f"shapley.value: method inrun .* only value loglik; got {value}"):
            load_params(path)
    path.write_text("shapley:\n  method: inrun\n")
    assert load_params(path).shapley.method == "inrun"


def test_a_warm_up_is_the_inrun_methods_alone(tmp_path):
    path = tmp_path / "params.yaml"
    for method in ("retrain", "forward"):
        path.write_text(f"shapley:\n  method: {method}\n  players: records\n  warmup: 0.1\n")
        with pytest.raises(ShedError, match=f"shapley.warmup: the warm-up fit is method inrun's; method {method}"):
            load_params(path)
    path.write_text("shapley:\n  method: inrun\n  warmup: 0.1\n")
    assert load_params(path).shapley.warmup == 0.1


def test_switching_method_reruns_the_shapley_stage_onward_only():
    """method is a key of the shapley block, which only the shapley stage reads (sample reads the value
    model's keys, not the method): DVC reruns it and what depends on its outputs (sample, finetune,
    evaluate), nothing upstream."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    readers = [name for name, spec in stages.items() if {"shapley", "shapley.method"} & set(spec.get("params", []))]
    assert readers == ["shapley"]
    assert "method" in yaml.safe_load((ROOT / "params.yaml").read_text())["shapley"]


# --- the stage as a process ----------------------------------------------------------------------

COLUMNS = "cluster,proxy_id,size,score,stderr,credits"


def set_params(ws: Path, epochs: int = 1, **shapley) -> None:
    write_stage_params(ws, epochs, **{"method": "inrun", **shapley})


def finished_runs(ws: Path) -> list[Path]:
    return sorted((ws / "data/shapley_jobs/inrun").glob("*/run-[0-9][0-9][0-9][0-9].json"))


def mid_run_checkpoints(ws: Path) -> list[dict]:
    """The run-NNNN.partial.json files there are (a run in progress), read; one replaced while read is skipped."""
    out = []
    for path in sorted((ws / "data/shapley_jobs/inrun").glob("*/run-*.partial.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    return out


@pytest.mark.slow
def test_the_inrun_stage_writes_the_retrain_stages_outputs_and_is_deterministic(ws, tmp_path):
    set_params(ws, epochs=2, k=3)
    run_stage(ws, "shapley")
    scores = (ws / "data/shapley/scores.csv").read_text().splitlines()
    assert scores[0] == COLUMNS and len(scores) == 1 + 8
    assert all(line.split(",")[-1] == "3" for line in scores[1:])  # one credit per run
    m = metrics(ws)
    assert m["method"] == "inrun" and m["runs"] == 3 and m["runs_run"] == 3 and m["runs_reused"] == 0
    assert m["steps"] == 2 and m["steps_run"] == 6 and m["seconds"] > 0 and m["value"] == "loglik"
    runs = [json.loads(line) for line in (ws / "data/shapley/subsets.jsonl").read_text().splitlines()]
    assert [r["run"] for r in runs] == [0, 1, 2] and [r["seed"] for r in runs] == [0, 1, 2]
    assert all(r["steps"] == 2 and r["v_after"] != r["v_before"] for r in runs)
    for name in ["plots/shapley.png", "plots/convergence.png", "plots/shapley_scores.csv"]:
        assert (ws / name).stat().st_size > 0
    assert len(finished_runs(ws)) == 3
    curves = ws / "dvclive/shapley/plots/metrics"
    for r in range(3):  # each run's training curve, one row per step
        rows = (curves / f"run-{r}/loss.tsv").read_text().splitlines()
        assert rows[0].split("\t") == ["step", "loss"] and [line.split("\t")[0] for line in rows[1:]] == ["0", "1"]
    curve_bytes = {p: p.read_bytes() for p in curves.rglob("*.tsv")}

    # Rerun with the runs kept: nothing is trained, the same bytes (the curves come from the saved runs).
    first = (ws / "data/shapley/scores.csv").read_bytes()
    run_stage(ws, "shapley")
    assert {p: p.read_bytes() for p in curves.rglob("*.tsv")} == curve_bytes
    assert metrics(ws)["runs_reused"] == 3 and metrics(ws)["runs_run"] == 0
    assert (ws / "data/shapley/scores.csv").read_bytes() == first
    # From scratch in another workspace: the same bytes again.
    again = tmp_path / "again"
    shutil.copytree(ws, again)
    shutil.rmtree(again / "data/shapley_jobs")
    run_stage(again, "shapley")
    assert metrics(again)["runs_run"] == 3
    assert (again / "data/shapley/scores.csv").read_bytes() == first

    # The single game (dev_neighbours 0) reads the same runs: the token-weighted whole-dev credit.
    set_params(ws, epochs=2, k=3, dev_neighbours=0)
    run_stage(ws, "shapley")
    assert metrics(ws)["runs_reused"] == 3
    single = (ws / "data/shapley/scores.csv").read_text().splitlines()
    assert single[0] == COLUMNS and single[1:] != scores[1:]
    # Raising k reuses the earlier runs.
    set_params(ws, epochs=2, k=4, dev_neighbours=0)
    run_stage(ws, "shapley")
    assert metrics(ws)["runs_reused"] == 3 and metrics(ws)["runs_run"] == 1


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_gives_identical_scores_and_reuses_finished_runs(ws, tmp_path):
    slow = {"k": 3, "epochs": 12}  # runs slow enough for the kill to land between the first and the last
    reference = tmp_path / "reference"
    shutil.copytree(ws, reference)
    set_params(reference, **slow)
    run_stage(reference, "shapley")

    set_params(ws, **slow)
    kill_stage_when(ws, lambda: bool(finished_runs(ws)))
    finished = len(finished_runs(ws))
    assert 1 <= finished < 3, "the kill must land mid-stage"

    run_stage(ws, "shapley")
    assert (ws / "data/shapley/scores.csv").read_bytes() == (reference / "data/shapley/scores.csv").read_bytes()
    assert metrics(ws)["runs_reused"] == finished and metrics(ws)["runs_run"] == 3 - finished
    assert len(finished_runs(ws)) == 3
    print(f"SIGKILL after {finished} of 3 runs: the rerun reused {finished}, ran {3 - finished}; "
          "scores.csv byte-identical to an uninterrupted run")


@pytest.mark.slow
def test_sigkill_mid_run_resumes_at_its_last_checkpoint_and_gives_identical_scores(ws, tmp_path):
    """checkpoint_seconds 0 checkpoints the run in progress after every step: killed in its first half, the
    rerun resumes that run at its last checkpoint, not at its start, and ends with the bytes of an
    uninterrupted run (whose checkpoint_seconds, the default 300, takes no checkpoint at all)."""
    slow = {"k": 2, "epochs": 12}  # 8 proxies, batch 16: 12 steps a run
    reference = tmp_path / "reference"
    shutil.copytree(ws, reference)
    set_params(reference, **slow)
    run_stage(reference, "shapley")
    assert metrics(reference)["resumed"] == []

    set_params(ws, checkpoint_seconds=0, **slow)
    kill_stage_when(ws, lambda: any(3 <= c["step"] <= 8 for c in mid_run_checkpoints(ws)))
    (partial,) = mid_run_checkpoints(ws)
    assert 3 <= partial["step"] < 12, "the kill must land mid-run, after checkpoints replaced each other"
    run, step = partial["run"], partial["step"]
    assert len(finished_runs(ws)) == run  # runs go in order: the ones before it are finished

    run_stage(ws, "shapley")
    m = metrics(ws)
    assert m["resumed"] == [{"run": run, "from_step": step}]
    assert m["runs_reused"] == run and m["steps_run"] == (12 - step) + 12 * (1 - run)
    for name in ["data/shapley/scores.csv", "data/shapley/subsets.jsonl"]:
        assert (ws / name).read_bytes() == (reference / name).read_bytes(), name
    assert not mid_run_checkpoints(ws) and not list((ws / "data/shapley_jobs/inrun").glob("*/run-*.partial.*"))
    print(f"SIGKILL in run {run} after its step {step} of 12: the rerun resumed it there; "
          "scores.csv byte-identical to an uninterrupted run")


@pytest.mark.slow
def test_a_damaged_run_file_is_done_again(ws):
    set_params(ws, k=2)
    run_stage(ws, "shapley")
    first = (ws / "data/shapley/scores.csv").read_bytes()
    (damaged,) = (ws / "data/shapley_jobs/inrun").glob("*/run-0001.safetensors")
    damaged.write_bytes(damaged.read_bytes()[:-8])
    run_stage(ws, "shapley")
    assert metrics(ws)["runs_reused"] == 1 and metrics(ws)["runs_run"] == 1
    assert (ws / "data/shapley/scores.csv").read_bytes() == first


@pytest.mark.slow
def test_inrun_with_a_choice_value_is_a_one_line_error(ws):
    set_params(ws, value="choice_logprob")
    result = run_stage(ws, "shapley", ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "shapley.value: method inrun credits the gradient of the dev loss" in result.stderr
