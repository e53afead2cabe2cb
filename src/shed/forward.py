"""Forward-only record valuation (CoLoR-Filter, Brandfonbrener et al. 2024; docs/engine.md#forward).

A record z's score is `ℓ(z; θ₀) − ℓ(z; θ_dev)`: its response's mean per-token loss under the base model
minus the same loss after a short LoRA fit on the dev set (the train recipe, from the same adapter init
as every other fit). To first order θ_dev − θ₀ = −Σ_t η_t ∇L_dev(θ_t), so the score is the record's
gradient alignment with the dev set summed along a real training trajectory (warm-up included), the
quantity the in-run credit takes one step at a time, at two forward passes per record. Per-token means
keep a record's length out of it; no learning rate, clip or batch position enters. Positive: the fit
towards the dev set made z more likely (z is like the dev set); negative: less.

Runs r = 0..k-1 fit the dev set from seed train.seed + r (adapter init and data order); a record's
score is the mean over runs, its stderr their spread. Pure: no file I/O (the shapley stage stores runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from shed.losses import response_losses


@dataclass
class ForwardRun:
    """One dev-set fit: its seed, the players' losses after it and what it did to the dev set."""

    run: int
    seed: int
    losses: np.ndarray  # ℓ(z; θ_dev) per player
    dev_before: float  # mean per-token dev loss (the dev records' responses) before and after the fit
    dev_after: float
    train_loss: float
    seconds: float


def dev_as_records(dev: list[dict]) -> list[dict]:
    """The dev set as training records: an instruction record as itself, a question as the record that
    teaches its gold choice (its id kept: the trainer caches encodings by id)."""
    return [q if "instruction" in q else {"id": q["id"], "instruction": q["question"], "input": "",
                                          "output": q["choices"][q["answer"]]} for q in dev]


def _mean_loss(losses: list[float], tokens: np.ndarray) -> float:
    values = np.array(losses, dtype=float)
    keep = np.isfinite(values)
    return float((values[keep] * tokens[keep]).sum() / max(tokens[keep].sum(), 1))


def response_tokens(trainer, records: Sequence[dict]) -> np.ndarray:
    """Each record's labelled response tokens under the recipe (what its per-token loss averages over)."""
    return np.array([sum(label != -100 for label in trainer.encode(r)[1][1:]) for r in records], dtype=float)


def base_losses(trainer, records: Sequence[dict], batch_size: int, progress=None) -> np.ndarray:
    """ℓ(z; θ₀) per record: the adapter reset (LoRA B = 0, so the model is the base model)."""
    trainer.reset(trainer.cfg.seed)
    return np.array(response_losses(trainer.model, trainer.tokenizer, list(records), trainer.cfg.template,
                                    trainer.max_length, batch_size, progress), dtype=float)


def fit_and_score(trainer, records: Sequence[dict], dev_records: list[dict], run: int, batch_size: int,
                  progress=None) -> ForwardRun:
    """Run `run`: fit the dev set from seed train.seed + run, then ℓ(z; θ_dev) per record."""
    start = time.perf_counter()
    seed = trainer.cfg.seed + run
    dev_tokens = response_tokens(trainer, dev_records)
    trainer.reset(seed)
    before = _mean_loss(response_losses(trainer.model, trainer.tokenizer, dev_records, trainer.cfg.template,
                                        trainer.max_length, batch_size), dev_tokens)
    fit = trainer.fit(dev_records, seed=seed)
    after = _mean_loss(response_losses(trainer.model, trainer.tokenizer, dev_records, trainer.cfg.template,
                                       trainer.max_length, batch_size), dev_tokens)
    losses = np.array(response_losses(trainer.model, trainer.tokenizer, list(records), trainer.cfg.template,
                                      trainer.max_length, batch_size, progress), dtype=float)
    return ForwardRun(run, seed, losses, before, after, float(fit["loss"]), time.perf_counter() - start)


def differences(base: np.ndarray, runs: Sequence[ForwardRun]) -> np.ndarray:
    """(runs x players) base − tuned loss; NaN for a record cut to no response token (infinite losses)."""
    with np.errstate(invalid="ignore"):  # inf - inf
        diffs = np.stack([base - r.losses for r in runs])
    diffs[~np.isfinite(diffs)] = np.nan
    return diffs


def scores(base: np.ndarray, runs: Sequence[ForwardRun]) -> tuple[np.ndarray, np.ndarray]:
    """(score, stderr) per player: the mean over runs of base − tuned loss (`differences`), and its standard
    error (NaN for one run)."""
    diffs = differences(base, runs)
    mean = diffs.mean(0)
    stderr = diffs.std(0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else np.full(len(base), np.nan)
    return mean, stderr


def value_forward(trainer, records: Sequence[dict], dev_records: list[dict], runs: Sequence[int], batch_size: int,
                  base: np.ndarray | None = None, done: dict[int, ForwardRun] | None = None, progress=None,
                  on_base: Callable[[np.ndarray], None] | None = None,
                  on_run: Callable[[ForwardRun], None] | None = None) -> tuple[np.ndarray, list[ForwardRun]]:
    """(base losses, every run in `runs`): `base` and the runs in `done` are taken as given (a resumed
    stage), the rest computed, each handed to `on_base` / `on_run` as soon as it exists."""
    done = dict(done or {})
    if base is None:
        base = base_losses(trainer, records, batch_size, progress)
        if on_base is not None:
            on_base(base)
    for run in runs:
        if run not in done:
            done[run] = fit_and_score(trainer, records, dev_records, run, batch_size, progress)
            if on_run is not None:
                on_run(done[run])
    return base, [done[r] for r in runs]
