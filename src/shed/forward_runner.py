"""The forward method's driver: the model and the dev-fit trainer loaded once, the dev fits, then the records'
losses in shards, in this process or on shapley.workers workers.

`ForwardRunner(cfg, train, dev, dev_max_length)` loads shapley.model on shapley.device (or the device given)
with a LoRA trainer of the train recipe run for shapley.dev_epochs (0: train.epochs), and the dev set as
training records. `run(records, runs, book)` fits the dev set for each run the book has not kept, then yields
the records' losses under each model state (`shed.forward.states`: the base model's, then each run's), scored
in shards of shapley.shard_records records, train.micro_batch records and at most shapley.chunk_tokens padded
tokens a pass, the dev records cut at `dev_max_length`. With shapley.workers 1 (executor local) the shards are
scored on this trainer; otherwise on worker processes or Ray actors (shed.executors, shed.shards), each loading
the model once with every run's fitted adapter (safetensors bytes), a shard whose worker dies scored again
(shapley.max_retries): the same losses either way. Losses and fits the book (a `forward.LossBook`) holds are not
computed again; each shard computed goes into it as it is done. No file I/O here: the book, the progress bar
and the loss curves are the caller's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from shed.config import ShapleyConfig, TrainConfig

if TYPE_CHECKING:
    import numpy as np

    from shed import forward
    from shed.forward import ForwardRun, LossBook


class ForwardRunner:
    """Forward record losses: the dev fits here, the shards here or on workers (torch is imported when one is made,
    not with this module)."""

    def __init__(self, cfg: ShapleyConfig, train: TrainConfig, dev: list[dict], dev_max_length: int | None,
                 device: str | None = None):
        from shed import forward
        from shed.models import load_causal_lm, resolve_device
        from shed.training import LoraTrainer

        start = time.perf_counter()
        self.cfg, self.dev_max_length = cfg, dev_max_length
        self.device = resolve_device(device or cfg.device)
        model, tokenizer = load_causal_lm(cfg.model, self.device, cfg.dtype)
        self.recipe = dataclasses.replace(train, epochs=cfg.dev_epochs or train.epochs)
        self.trainer = LoraTrainer(model, tokenizer, self.recipe)
        self.dev_records = forward.dev_as_records(dev)
        self.setup_seconds = time.perf_counter() - start

    def needed(self, records: Sequence[dict], book: LossBook, runs: Sequence[int]) -> int:
        """Losses `run(records, runs, book)` will compute (those `book` lacks)."""
        from shed import forward

        return forward.needed(records, book, runs)

    def run(self, records: Sequence[dict], runs: Sequence[int], book: LossBook, *, progress=None,
            curves: Callable[[int], object] | None = None) -> Iterator[tuple[ForwardRun | None, np.ndarray]]:
        """(None, base losses), then (run r's summary, its losses) for each r in `runs`, as each is done.
        `progress`: a tqdm-like bar, updated per record scored; `curves(r)`: run r's dev-fit loss-curve callback."""
        from shed import forward

        cfg = self.cfg
        yield from forward.states(self.trainer, records, self.dev_records, runs, book, self.recipe.micro_batch,
                                  cfg.shard_records, progress, max_tokens=cfg.chunk_tokens,
                                  dev_max_length=self.dev_max_length, curves=curves,
                                  score=self.on_workers(progress) if cfg.workers > 1 or cfg.executor == "ray" else None)

    def on_workers(self, progress=None) -> forward.Scorer:
        """Scores shard tasks on shapley.workers workers (shapley.executor), each holding the model and the adapters."""
        from safetensors.torch import save

        from shed import shards

        cfg = self.cfg

        def score(tasks: list[dict], adapters: dict) -> Iterator[dict]:
            spec = shards.ScoreSpec(cfg.model, cfg.device, cfg.dtype, self.recipe, self.recipe.micro_batch,
                                    cfg.chunk_tokens, lora=True,
                                    adapters={state: save(tensors) for state, tensors in adapters.items()})
            return shards.score(spec, tasks, cfg.workers, cfg.executor, progress, max_retries=cfg.max_retries)

        return score
