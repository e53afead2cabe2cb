"""Data-parallel record scoring: per-record losses (sample's perplexity and IFD, the forward valuation's base and
tuned losses) in fixed shards, each scored by a worker holding one model, in-process or on shed.executors'
worker processes or Ray actors (shapley.workers, shapley.executor; placed on devices as retraining workers are).

A shard is shapley.shard_records consecutive records, in pool order, of those still to score under one model
state, and a worker scores a shard in one `losses.response_losses` call (its own longest-first batches). Shards
and their batches depend on the records and the settings alone, never on the worker count or on which worker
takes a shard, so 1 and N workers give the same losses bit for bit where the device's arithmetic does not depend
on its thread count (tests/test_shards.py checks it on CPU). The forward valuation keeps each finished shard as
one chunk of its store (`runstore.ForwardStore`): a killed stage never scores a finished shard again.

A worker loads the model once and, for the forward valuation, wraps it in the dev fit's LoRA modules and holds
each run's fitted adapter (`ScoreSpec.adapters`, safetensors bytes: tensors, never a pickle), switching adapters
as the shards' states change. No file I/O here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from shed.config import TrainConfig

BASE = "base"  # the base model's state (forward: LoRA B = 0); any other state names one of `ScoreSpec.adapters`


@dataclass(frozen=True)
class ScoreSpec:
    """What a scoring worker loads: the model, how records are prompted, cut and batched (the train recipe's
    template, max_length and micro-batch), and the model states it scores under."""

    model: str
    device: str
    dtype: str
    train: TrainConfig  # the recipe: template, max_length (0: the model's own), LoRA modules
    batch_size: int  # records per forward pass (train.micro_batch)
    max_tokens: int = 0  # padded tokens per forward pass (shapley.chunk_tokens; 0: no bound)
    lora: bool = False  # wrap the model in the recipe's LoRA modules (forward: its states are adapters)
    # state -> its adapter: safetensors bytes (`safetensors.torch.save`) for workers, the tensors in this process
    adapters: dict[str, bytes | dict] = field(default_factory=dict)

    def runner(self, device: str, threads: int = 0) -> ShardRunner:
        """A worker's runner (shed.executors builds one per worker)."""
        return ShardRunner(self, device, threads)


class ShardRunner:
    """One worker's model: `run(task)` scores a shard under the task's state."""

    def __init__(self, spec: ScoreSpec, device: str, threads: int = 0, trainer=None):
        """`trainer`: a loaded `LoraTrainer` of the spec's model and recipe to score with (in-process: no second
        copy of the model); otherwise the model is loaded here on `device` with `threads` CPU threads (0: torch's)."""
        import torch
        from safetensors.torch import load

        from shed.models import load_causal_lm, max_positions

        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        self.spec, self.trainer, self.state = spec, trainer, None
        if trainer is None:
            model, tokenizer = load_causal_lm(spec.model, device, spec.dtype)
            if spec.lora:
                from shed.training import LoraTrainer

                self.trainer = LoraTrainer(model, tokenizer, spec.train)
        if self.trainer is not None:
            self.model, self.tokenizer, self.max_length = self.trainer.model, self.trainer.tokenizer, \
                self.trainer.max_length
        else:
            self.model, self.tokenizer = model, tokenizer
            self.max_length = spec.train.max_length or max_positions(model) or 0
        self.adapters = {state: load(data) if isinstance(data, bytes) else data
                         for state, data in spec.adapters.items()}
        self.setup_seconds = time.perf_counter() - start  # reported with this worker's first shard

    @classmethod
    def on(cls, trainer, batch_size: int, max_tokens: int = 0, adapters: dict | None = None) -> ShardRunner:
        """A runner scoring on `trainer` (a loaded `LoraTrainer`) in this process, under its recipe and `adapters`
        (state -> tensors)."""
        spec = ScoreSpec("(loaded)", str(trainer.device), "auto", trainer.cfg, batch_size, max_tokens, lora=True,
                         adapters=adapters or {})
        return cls(spec, spec.device, trainer=trainer)

    def enter(self, state: str | None) -> None:
        """The model at `state`: the base model (BASE: LoRA B = 0) or an adapter of the spec."""
        if state == self.state or self.trainer is None:
            return
        from shed.forward import load_adapter

        if state == BASE:
            self.trainer.reset(self.trainer.cfg.seed)
        else:
            load_adapter(self.trainer, self.adapters[state])
        self.state = state

    def run(self, task: dict) -> dict:
        """task {key, state, records, unconditional} -> {key, state, unconditional, ids, losses, max_length,
        seconds, pid}; a worker's first result also carries its setup time (loading the model)."""
        from shed.losses import response_losses

        setup, self.setup_seconds = self.setup_seconds, 0.0
        start = time.perf_counter()
        self.enter(task["state"])
        records = task["records"]
        losses = response_losses(self.model, self.tokenizer, records, self.spec.train.template, self.max_length,
                                 self.spec.batch_size, unconditional=task["unconditional"],
                                 max_tokens=self.spec.max_tokens)
        return {"key": task["key"], "state": task["state"], "unconditional": task["unconditional"],
                "ids": [r["id"] for r in records], "losses": losses,
                "max_length": self.max_length, "seconds": time.perf_counter() - start, "setup_seconds": setup,
                "pid": os.getpid()}


def tasks(todo: dict[str | None, list[dict]], size: int, unconditional: bool = False) -> list[dict]:
    """The shard tasks of `todo` (state -> the records to score under it, in pool order): each state's records
    cut into consecutive shards of `size`, states in the given order (a worker then switches adapters seldom)."""
    return [{"key": f"{state or 'model'}{'.alone' if unconditional else ''}.shard-{i // size:06d}", "state": state,
             "records": records[i:i + size], "unconditional": unconditional}
            for state, records in todo.items() for i in range(0, len(records), size)]


def score(spec: ScoreSpec, shards: list[dict], workers: int = 1, executor: str = "local", progress=None,
          runner: ShardRunner | None = None, max_retries: int = 2) -> Iterator[dict]:
    """Each shard's result (`ShardRunner.run`) as it finishes: on `runner` in this process if given, else on
    shed.executors' workers (1 local: in this process; more: processes, or Ray actors), a shard whose worker dies
    scored again on a fresh one, at most `max_retries` times (shapley.max_retries). `progress`: a tqdm-like bar,
    updated by each finished shard's records."""
    from shed.executors import run_jobs

    results: Iterable[dict] = (runner.run(t) for t in shards) if runner is not None else \
        run_jobs(spec, shards, workers, executor, max_retries)
    for result in results:
        if progress is not None:
            progress.update(len(result["ids"]))
        yield result
