"""The in-run method's worker: model, trainer, dev batch and valued records loaded once, then the runs given.

`InRunRunner(cfg, train, dev, dev_max_length, records, players)` loads shapley.model on shapley.device (or the
device given) with the train recipe's LoRA trainer, the dev items as one padded batch cut at `dev_max_length`, and
the records to value (records[i] is players[i]'s). `run(runs)` then fits and credits each run on all of them
(`shed.inrun.value_runs` with shapley.direction, dev_chunk, chunk_tokens, dev_every, normalize, warmup) and yields
it as it finishes: its `RunSummary` and its credits as a one-run `InRunCredits`. A run depends on its index alone,
so runs may be split between runners. No file I/O: the caller keeps what is yielded, and passes the progress bar,
mid-run checkpoints and loss curves in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from shed.config import ShapleyConfig, TrainConfig

if TYPE_CHECKING:
    from shed.inrun import InRunCredits, RunSummary


class InRunRunner:
    """In-run credits for one worker (torch is imported when one is made, not with this module)."""

    def __init__(self, cfg: ShapleyConfig, train: TrainConfig, dev: list[dict], dev_max_length: int | None,
                 records: list[dict], players: Sequence[int], device: str | None = None):
        from shed import inrun
        from shed.models import load_causal_lm, resolve_device
        from shed.training import LoraTrainer, pad_rows

        start = time.perf_counter()
        self.cfg, self.n_dev, self.records, self.players = cfg, len(dev), records, list(players)
        self.device = resolve_device(device or cfg.device)
        model, tokenizer = load_causal_lm(cfg.model, self.device, cfg.dtype)
        self.trainer = LoraTrainer(model, tokenizer, train)
        self.dev_batch = pad_rows(inrun.dev_rows(tokenizer, dev, train.template, dev_max_length),
                                  tokenizer.pad_token_id, self.trainer.device)
        self.weights = inrun.token_weights(self.dev_batch)  # each dev item's share of the dev loglik
        self.setup_seconds = time.perf_counter() - start
        self.steps = len(self.trainer.schedule(records, train.seed))  # optimizer steps a run takes

    def run(self, runs: Sequence[int], *, progress=None, checkpoints: Callable[[int], object] | None = None,
            curves: Callable[[int], object] | None = None) -> Iterator[tuple[RunSummary, InRunCredits]]:
        """(summary, one-run credits) of each run in `runs`, as it finishes. `progress`: a tqdm-like bar, updated
        once per step; `checkpoints(r)`: run r's mid-run checkpoint (`training.Checkpoint`), which it resumes
        from; `curves(r)`: run r's loss-curve callback."""
        from shed import inrun

        cfg = self.cfg
        for run in runs:
            # value_runs credits run r in row r of its accumulator; the rows before it are never written
            # (numpy's zeros stay unallocated pages), so this holds one run's credits.
            credits = inrun.InRunCredits(self.players, self.n_dev, run + 1)
            (summary,) = inrun.value_runs(self.trainer, self.records, self.players, self.dev_batch, credits, [run],
                                          direction=cfg.direction, dev_chunk=cfg.dev_chunk,
                                          dev_tokens=cfg.chunk_tokens, dev_every=cfg.dev_every,
                                          normalize=cfg.normalize, warmup=cfg.warmup, progress=progress,
                                          checkpoints=checkpoints, curves=curves)
            yield summary, credits.run_slice(run)
