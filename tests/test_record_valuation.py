"""Every record valued: the forward (CoLoR-Filter) estimator against a hand computation, cluster aggregation,
and the shapley stage with shapley.players records (record_scores.csv, resume, the length correlation)."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import run_stage, tiny_float64_trainer
from helpers import shapley_metrics as metrics

from shed import forward
from shed.config import LoraConfig, TrainConfig
from shed.losses import response_losses

RECORDS = [
    {"id": f"r{i}", "instruction": f"Name a {kind}.", "input": "", "output": answer}
    for i, (kind, answer) in enumerate([("colour", "red"), ("animal", "dog cat"), ("number", "three"),
                                        ("fruit", "plum"), ("colour", "blue green")])
]
DEV = [{"id": "q0", "question": "Name a colour.", "choices": ["red", "dog"], "answer": 0},
       {"id": "q1", "instruction": "Name a colour.", "input": "", "output": "blue green"}]
TRAIN = TrainConfig(template="qa", batch_size=2, epochs=3, lr=0.05, max_length=64,
                    lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trainer():
    questions = [{"question": "Name a colour.", "choices": ["red", "dog"]}]
    return tiny_float64_trainer(RECORDS, questions, TRAIN)


def test_dev_items_become_the_records_that_teach_their_answers():
    assert forward.dev_as_records(DEV) == [
        {"id": "q0", "instruction": "Name a colour.", "input": "", "output": "red"}, DEV[1]]


class Book:
    """forward.LossBook in memory."""

    def __init__(self):
        self.known, self.fits, self.added = {}, {}, []

    def losses(self, key):
        return self.known.setdefault(key, {})

    def add_losses(self, key, ids, losses):
        self.added.append((key, list(ids)))
        self.losses(key).update(zip(ids, losses))

    def fit(self, run):
        return self.fits.get(run)

    def add_fit(self, summary, adapter):
        self.fits[summary.run] = (summary, adapter)


def test_a_records_score_is_its_base_loss_minus_its_loss_after_the_dev_fit(trainer):
    dev = forward.dev_as_records(DEV)
    base, tuned, runs = forward.value_forward(trainer, RECORDS, dev, [0, 1], Book(), batch_size=2)
    # The base: the adapter at its init (B = 0) is the base model, so the plain loss of a fresh reset.
    trainer.reset(123)
    assert base == pytest.approx(response_losses(trainer.model, trainer.tokenizer, RECORDS, "qa", 64, 5), rel=1e-9)
    # Each run: a fit on the dev set from seed train.seed + run, then the loss again.
    for run, losses in zip(runs, tuned):
        trainer.fit(dev, seed=run.seed)
        assert run.seed == TRAIN.seed + run.run
        assert losses == pytest.approx(response_losses(trainer.model, trainer.tokenizer, RECORDS, "qa", 64, 1),
                                       rel=1e-9)
        assert run.dev_after < run.dev_before  # the fit learnt the dev set
    score, stderr = forward.scores(base, tuned)
    diffs = base[None, :] - tuned
    assert score == pytest.approx(diffs.mean(0)) and stderr == pytest.approx(diffs.std(0, ddof=1) / np.sqrt(2))
    # The records the dev set teaches gain most: "red" and "blue green" under "Name a colour."
    assert set(np.argsort(-score)[:2]) == {0, 4}


def test_a_record_scored_before_is_not_scored_again_and_a_kept_fit_is_not_refitted(trainer, monkeypatch):
    dev = forward.dev_as_records(DEV)
    book = Book()
    base, tuned, _ = forward.value_forward(trainer, RECORDS[:3], dev, [0, 1], book, batch_size=2, chunk=2)
    assert [len(ids) for _, ids in book.added] == [2, 1, 2, 1, 2, 1]  # chunks of 2: a killed pass keeps them
    # A grown pool: only the two new records are scored, under each key, and no fit is redone.
    monkeypatch.setattr(trainer, "fit", lambda *a, **k: pytest.fail("refitted a kept run"))
    book.added.clear()
    assert forward.needed(RECORDS, book, [0, 1]) == 2 * 3
    grown_base, grown_tuned, _ = forward.value_forward(trainer, RECORDS, dev, [0, 1], book, batch_size=2)
    assert book.added == [(key, ["r3", "r4"]) for key in ("base", "run-0000", "run-0001")]
    assert grown_base[:3] == pytest.approx(base) and grown_tuned[:, :3] == pytest.approx(tuned)
    # ... and equal what a fresh book gives for every record (the kept adapter is the fitted one).
    monkeypatch.undo()
    fresh_base, fresh_tuned, _ = forward.value_forward(trainer, RECORDS, dev, [0, 1], Book(), batch_size=2)
    assert grown_base == pytest.approx(fresh_base, rel=1e-9) and grown_tuned == pytest.approx(fresh_tuned, rel=1e-9)


def test_one_run_has_no_stderr_and_a_record_cut_to_nothing_scores_nan():
    score, stderr = forward.scores(np.array([1.5, np.inf]), np.array([[1.0, np.inf]]))
    assert score[0] == pytest.approx(0.5) and np.isnan(score[1]) and np.isnan(stderr).all()


def test_cluster_aggregates_and_their_stderr():
    from shed.stages.shapley import aggregate, length_correlation

    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0, np.nan])
    assert aggregate(values, "mean")[0] == pytest.approx(22.0)
    assert aggregate(values, "median")[0] == pytest.approx(3.0)
    assert aggregate(np.arange(10.0), "trimmed")[0] == pytest.approx(4.5)
    assert aggregate(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 90.0]), "trimmed")[0] == 0.0
    assert aggregate(values, "mean")[1] == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1) / np.sqrt(5))
    assert all(np.isnan(aggregate(np.array([np.nan]), "mean")))
    assert length_correlation(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0, 40.0])) == 1.0
    assert length_correlation(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])) is None


# --- the stage as a user runs it ---

def set_params(ws, epochs: int = 1, **shapley) -> None:
    path = ws / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["shapley"].update(shapley)
    params["train"]["epochs"] = epochs
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_forward_over_every_record_writes_record_scores_and_aggregated_cluster_scores(ws, tmp_path):
    set_params(ws, method="forward", players="records", k=2, aggregate="median")
    run_stage(ws, "shapley")
    pool = [json.loads(line) for line in (ws / "data/prepared/pool.jsonl").read_text().splitlines()]
    assignments = pd.read_csv(ws / "data/clusters/assignments.csv", dtype={"id": str})
    records = pd.read_csv(ws / "data/shapley/record_scores.csv", dtype={"id": str})
    assert list(records.columns) == ["id", "cluster", "score", "stderr", "tokens", "loss"]
    assert records["id"].tolist() == [r["id"] for r in pool]  # one row per pool record, in pool order
    assert records["cluster"].tolist() == assignments.set_index("id").loc[records["id"], "cluster"].tolist()
    assert records["score"].notna().all() and records["stderr"].notna().all() and (records["tokens"] > 0).all()
    scores = pd.read_csv(ws / "data/shapley/scores.csv")
    medians = records.groupby("cluster")["score"].median()
    assert scores.set_index("cluster")["score"].to_dict() == pytest.approx(medians.to_dict())
    assert scores.set_index("cluster")["credits"].to_dict() == records.groupby("cluster").size().to_dict()
    m = metrics(ws)
    assert (m["method"], m["players"], m["records_valued"]) == ("forward", "records", len(pool))
    assert m["losses_computed"] == 3 * len(pool)  # the base and two runs
    assert -1 <= m["length_spearman"] <= 1 and m["v_full"] > m["v_empty"]  # the dev fit learnt the dev set
    curve = (ws / "dvclive/shapley/plots/metrics/run-1/dev_loss.tsv").read_text().splitlines()
    assert curve[0].split("\t") == ["step", "dev_loss"] and len(curve) == 3  # before and after run 1's dev fit
    first = {p: (ws / "data/shapley" / p).read_bytes() for p in ("scores.csv", "record_scores.csv")}
    # Rerun: every loss is kept, nothing is recomputed, the same bytes.
    run_stage(ws, "shapley")
    assert metrics(ws)["losses_computed"] == 0
    assert {p: (ws / "data/shapley" / p).read_bytes() for p in first} == first
    # A lost chunk of run 1's losses is recomputed alone, from the kept adapter, to the same bytes.
    next((ws / "data/shapley_jobs/forward").glob("*/run-0001.chunk-000000.json")).unlink()
    run_stage(ws, "shapley")
    assert metrics(ws)["losses_computed"] == len(pool)
    assert {p: (ws / "data/shapley" / p).read_bytes() for p in first} == first
    # Another dev set shares the base losses: only its runs are computed.
    dev_path = ws / "data/prepared/dev.jsonl"
    dev_path.write_text("".join(dev_path.read_text().splitlines(keepends=True)[:-1]))
    run_stage(ws, "shapley")
    assert metrics(ws)["losses_computed"] == 2 * len(pool)


@pytest.mark.slow
def test_inrun_over_every_record_and_sampling_by_record_value(ws):
    set_params(ws, method="inrun", players="records", k=1)
    run_stage(ws, "shapley")
    pool = (ws / "data/prepared/pool.jsonl").read_text().splitlines()
    records = pd.read_csv(ws / "data/shapley/record_scores.csv", dtype={"id": str})
    assert len(records) == len(pool) and records["score"].notna().all() and records["loss"].isna().all()
    assert metrics(ws)["players"] == "records" and metrics(ws)["steps"] > 0
    assert metrics(ws)["efficiency"] is not None  # raw credits: their sum against the measured dev change
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["sample"].update(method="qocs", within="value", subset_size=20)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stage(ws, "sample")
    chosen = [json.loads(line)["id"] for line in (ws / "data/curated/records.jsonl").read_text().splitlines()]
    assert len(chosen) == 20
    # The first cluster taken gives its members by record value, highest first.
    score = dict(zip(records["id"], records["score"]))
    cluster = dict(zip(records["id"], records["cluster"]))
    first = [i for i in chosen if cluster[i] == cluster[chosen[0]]]
    assert [score[i] for i in first] == sorted((score[i] for i in first), reverse=True)


def test_retrain_over_every_record_is_refused_in_one_line(tmp_path):
    from helpers import ROOT

    from shed.config import load_params
    from shed.fileio import ShedError

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["shapley"]["players"] = "records"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ShedError, match="shapley.players.*method inrun or forward"):
        load_params(tmp_path / "params.yaml")


# --- in-run credits free of length, batch position and step size ---

def one_step_credits(trainer, normalize: str) -> tuple[np.ndarray, float]:
    """(credits per record x dev question, the step's lr) of a one-step run over all RECORDS (batch 5, one epoch)."""
    from shed import inrun
    from shed.training import pad_rows

    dev = pad_rows(inrun.dev_rows(trainer.tokenizer, [DEV[0]]), trainer.tokenizer.pad_token_id)
    credits = inrun.InRunCredits(list(range(len(RECORDS))), 1, 1)
    inrun.value_runs(trainer, RECORDS, list(range(len(RECORDS))), dev, credits, [0], normalize=normalize)
    return credits.totals[0].copy(), dev


@pytest.fixture(scope="module")
def one_step_trainer():
    import dataclasses

    questions = [{"question": "Name a colour.", "choices": ["red", "dog"]}]
    return tiny_float64_trainer(RECORDS, questions, dataclasses.replace(TRAIN, batch_size=5, epochs=1, lr=0.05,
                                                                         max_grad_norm=1e-3))


def test_tokens_and_cosine_credits_divide_out_length_batch_share_and_the_steps_scale(one_step_trainer):
    from shed import inrun
    from shed.training import pad_rows

    trainer = one_step_trainer
    raw, dev = one_step_credits(trainer, "none")
    tokens, _ = one_step_credits(trainer, "tokens")
    cosine, _ = one_step_credits(trainer, "cosine")
    # The per-token gradients and the dev gradient at θ_0 (the run's one step is taken there).
    trainer.reset(trainer.cfg.seed)
    batch = pad_rows([trainer.encode(r) for r in RECORDS], trainer.tokenizer.pad_token_id)
    own = inrun.per_example_grads(trainer.model, batch, "example").flat().double()
    question = inrun.per_example_grads(trainer.model, dev, "example").flat().double()[0]
    dots = (own @ question).numpy()
    lr0 = trainer.cfg.lr  # one step, a warmup of one step: the step takes the peak lr
    assert tokens[:, 0] == pytest.approx(dots, rel=1e-6)
    norms = own.norm(dim=1).numpy() * float(question.norm())
    assert cosine[:, 0] == pytest.approx(dots / norms, rel=1e-6)
    assert np.all(np.abs(cosine) <= 1 + 1e-9)
    # The raw credit carries the clip factor and each record's share of the step's tokens: tokens removes both.
    share = inrun.response_tokens(batch) / inrun.response_tokens(batch).sum()
    coefficient = raw[:, 0] / (dots * share * lr0)
    assert np.allclose(coefficient, coefficient[0], rtol=1e-6) and coefficient[0] < 1  # the step was clipped
