"""Forward-only record valuation (CoLoR-Filter, Brandfonbrener et al. 2024; docs/engine.md#forward).

A record z's score is `ℓ(z; θ₀) − ℓ(z; θ_dev)`: its response's mean per-token loss under the base model
minus the same loss after a short LoRA fit on the dev set (the train recipe, from the same adapter init
as every other fit). To first order θ_dev − θ₀ = −Σ_t η_t ∇L_dev(θ_t), so the score is the record's
gradient alignment with the dev set summed along a real training trajectory (warm-up included), the
quantity the in-run credit takes one step at a time, at two forward passes per record. Per-token means
keep a record's length out of it; no learning rate, clip or batch position enters. Positive: the fit
towards the dev set made z more likely (z is like the dev set); negative: less.

Runs r = 0..k-1 fit the dev set from seed train.seed + r (adapter init and data order); a record's
score is the mean over runs, its stderr their spread.

The dev records are fitted and scored as training records, cut at train.max_length and at the stage's dev cap
(shapley.dev_max_length); losses are taken at most shapley.chunk_tokens padded tokens a forward pass.

Losses are kept per record id (a content hash) in a `LossBook` the caller provides (the shapley stage
stores it on disk): a record scored before under the same model state is never scored again (a grown
pool, another pool sharing records, a killed pass resumed shard by shard), and a run's fitted adapter is
kept, so scoring new records needs no refit. The losses are taken in fixed shards (`shed.shards`), in this
process or on workers holding the model and the runs' adapters, with the same floats either way. Pure: no
file I/O here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from shed.losses import response_losses
from shed.shards import BASE

# BASE (shed.shards): the book's key of the base model's losses; run r's is `run_key(r)`


def run_key(run: int) -> str:
    return f"run-{run:04d}"


@dataclass
class ForwardRun:
    """One dev-set fit: its seed and what it did to the dev set."""

    run: int
    seed: int
    dev_before: float  # mean per-token dev loss (the dev records' responses) before and after the fit
    dev_after: float
    train_loss: float
    seconds: float  # the fit, with the dev losses around it
    losses: list[float] = field(default_factory=list)  # the fit's loss at each step, to 6 places (its curve;
    #                                                    none in fits kept before curves were)


class LossBook(Protocol):
    """Where `states` finds and leaves what it computed (the stage's `ForwardStore`)."""

    def losses(self, key: str) -> dict[str, float]:
        """The losses known under `key` (BASE or a run's), by record id."""

    def add_losses(self, key: str, ids: list[str], losses: list[float]) -> None:
        """Keep these (more records' losses under `key`)."""

    def fit(self, run: int) -> tuple[ForwardRun, dict[str, torch.Tensor]] | None:
        """Run `run`'s summary and fitted adapter, if kept."""

    def add_fit(self, summary: ForwardRun, adapter: dict[str, torch.Tensor]) -> None:
        """Keep run `summary.run`'s summary and fitted adapter."""


def dev_as_records(dev: list[dict]) -> list[dict]:
    """The dev set as training records: an instruction record as itself, a question as the record that
    teaches its gold choice (its id kept: the trainer caches encodings by id)."""
    return [q if "instruction" in q else {"id": q["id"], "instruction": q["question"], "input": "",
                                          "output": q["choices"][q["answer"]]} for q in dev]


def response_tokens(trainer, records: Sequence[dict]) -> np.ndarray:
    """Each record's labelled response tokens under the recipe (what its per-token loss averages over)."""
    return np.array([sum(label != -100 for label in trainer.encode(r)[1][1:]) for r in records], dtype=float)


def _losses(trainer, records: Sequence[dict], batch_size: int, max_tokens: int = 0) -> list[float]:
    return response_losses(trainer.model, trainer.tokenizer, list(records), trainer.cfg.template, trainer.max_length,
                           batch_size, max_tokens=max_tokens)


def _mean_loss(trainer, records: list[dict], batch_size: int, max_tokens: int) -> float:
    values, tokens = np.array(_losses(trainer, records, batch_size, max_tokens=max_tokens)), \
        response_tokens(trainer, records)
    keep = np.isfinite(values)
    return float((values[keep] * tokens[keep]).sum() / max(tokens[keep].sum(), 1))


def adapter_state(trainer) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights, detached copies on the CPU."""
    return {name: p.detach().cpu().clone() for name, p in trainer.trainable()}


def load_adapter(trainer, state: dict[str, torch.Tensor]) -> None:
    named = dict(trainer.trainable())
    if set(named) != set(state):
        raise ValueError("a kept adapter of other LoRA modules than the trainer's")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(state[name].to(p.device, p.dtype))


def missing(records: Sequence[dict], book: LossBook, runs: Sequence[int]) -> dict[str, list[dict]]:
    """Each model state's records the book has no loss for, in record order: the base model's, then each run's."""
    keys = [BASE] + [run_key(r) for r in runs]
    return {key: [r for r in records if r["id"] not in book.losses(key)] for key in keys}


def needed(records: Sequence[dict], book: LossBook, runs: Sequence[int]) -> int:
    """Records to score (base, then each run) before `states` is done: its progress total."""
    return sum(len(todo) for todo in missing(records, book, runs).values())


def fits(trainer, dev_records: list[dict], runs: Sequence[int], book: LossBook, batch_size: int, *,
         max_tokens: int = 0, dev_max_length: int | None = None, curves: Callable[[int], object] | None = None
         ) -> Iterator[ForwardRun]:
    """Each run's dev fit, as it is done: the book's where it kept one, else fitted here (from seed train.seed + run)
    and kept in the book with its adapter. The dev records are fitted and scored (their loss before and after,
    `batch_size` records and at most `max_tokens` padded tokens a pass) cut at `dev_max_length` as well as the
    recipe's max_length (`LoraTrainer.cut_at`). `curves(r)`, if given, is run r's fit callback
    (`curves.StepCurve`): it sees each step of the dev fit as it happens, or, for a kept fit, its steps' losses at
    once (`resumed`)."""
    for run in runs:
        kept = book.fit(run)
        if kept is not None:
            if curves is not None:
                curves(run).resumed(kept[0].losses)
            yield kept[0]
            continue
        start = time.perf_counter()
        seed = trainer.cfg.seed + run
        trainer.reset(seed)
        with trainer.cut_at(dev_max_length):
            before = _mean_loss(trainer, dev_records, batch_size, max_tokens)
            fit = trainer.fit(dev_records, seed=seed, callback=curves(run) if curves is not None else None)
            after = _mean_loss(trainer, dev_records, batch_size, max_tokens)
        summary = ForwardRun(run, seed, before, after, float(fit["loss"]), time.perf_counter() - start,
                             [round(x, 6) for x in fit["losses"]])
        book.add_fit(summary, adapter_state(trainer))
        yield summary


# Scores shard tasks (`shards.tasks`) under the given adapters (run key -> its tensors), yielding their results.
Scorer = Callable[[list[dict], dict[str, dict[str, torch.Tensor]]], Iterable[dict]]


def states(trainer, records: Sequence[dict], dev_records: list[dict], runs: Sequence[int], book: LossBook,
           batch_size: int, chunk: int = 2048, progress=None, *, max_tokens: int = 0,
           dev_max_length: int | None = None, curves: Callable[[int], object] | None = None,
           score: Scorer | None = None) -> Iterator[tuple[ForwardRun | None, np.ndarray]]:
    """The records' losses under each model state, by `book` where it knows them: (None, the base model's), then
    (run r's summary, its) for each r in `runs`. First every run's dev fit (`fits`), then the losses the book lacks,
    each state's in shards of `chunk` records (`shards.tasks`), `batch_size` records and at most `max_tokens` padded
    tokens a pass (0: no bound), each shard added to the book as it is done: on `trainer` in this process, or by
    `score` (on workers: shed.forward_runner). The shards and their batches do not depend on who scores them, so
    neither do the losses. `progress`: a tqdm-like bar, updated by each shard's records."""
    from shed import shards

    summaries = list(fits(trainer, dev_records, runs, book, batch_size, max_tokens=max_tokens,
                          dev_max_length=dev_max_length, curves=curves))
    tasks = shards.tasks(missing(records, book, runs), chunk)
    adapters = {run_key(run): book.fit(run)[1] for run in runs} if tasks else {}
    if score is None:
        runner = shards.ShardRunner.on(trainer, batch_size, max_tokens, adapters)
        results = shards.score(runner.spec, tasks, progress=progress, runner=runner)
    else:
        results = score(tasks, adapters)
    for result in results:
        book.add_losses(result["state"], result["ids"], result["losses"])
    for summary in [None, *summaries]:
        known = book.losses(BASE if summary is None else run_key(summary.run))
        yield summary, np.array([known[r["id"]] for r in records], dtype=float)


def value_forward(trainer, records: Sequence[dict], dev_records: list[dict], runs: Sequence[int], book: LossBook,
                  batch_size: int, chunk: int = 2048, progress=None, *, max_tokens: int = 0,
                  dev_max_length: int | None = None, curves: Callable[[int], object] | None = None,
                  score: Scorer | None = None) -> tuple[np.ndarray, np.ndarray, list[ForwardRun]]:
    """(base losses, tuned losses runs x records, each run's summary): `states`, collected."""
    (_, base), *tuned = states(trainer, records, dev_records, runs, book, batch_size, chunk, progress,
                               max_tokens=max_tokens, dev_max_length=dev_max_length, curves=curves, score=score)
    return base, np.stack([losses for _, losses in tuned]), [summary for summary, _ in tuned]


def differences(base: np.ndarray, tuned: np.ndarray) -> np.ndarray:
    """(runs x players) base − tuned loss; NaN for a record cut to no response token (infinite losses)."""
    with np.errstate(invalid="ignore"):  # inf - inf
        diffs = base[None, :] - tuned
    diffs[~np.isfinite(diffs)] = np.nan
    return diffs


def scores(base: np.ndarray, tuned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, stderr) per player: the mean over runs of base − tuned loss (`differences`), and its standard
    error (NaN for one run)."""
    diffs = differences(base, tuned)
    mean = diffs.mean(0)
    stderr = diffs.std(0, ddof=1) / np.sqrt(len(diffs)) if len(diffs) > 1 else np.full(len(base), np.nan)
    return mean, stderr
