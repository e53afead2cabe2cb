"""finetune: LoRA fine-tune finetune.model on the curated dataset -> models/finetuned (a PEFT adapter).

    shed finetune                      # params.yaml: finetune.*, train.*
    # finetune.model may differ from shapley.model: the paper's transferability experiment.

The training curve (loss and learning rate per step) is logged with dvclive into
dvclive/finetune/plots/metrics/{loss,lr}.tsv, which dvc.yaml declares as plots: `dvc plots show`,
`dvc plots diff <exp>`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from shed import artifacts
from shed.config import Params
from shed.fileio import ShedError, atomic_path
from shed.models import load_causal_lm
from shed.training import LoraTrainer

log = logging.getLogger(__name__)


class Curve:
    """A LoraTrainer.fit callback: each step's training loss and learning rate, logged with dvclive."""

    def __init__(self, live):
        self.live = live

    def before_step(self, step: int, batches, lr: float) -> None:
        pass

    def after_step(self, step: int, loss: float, lr: float) -> None:
        self.live.step = step
        self.live.log_metric("loss", round(loss, 6))
        self.live.log_metric("lr", lr)


def main(params: Params) -> None:
    cfg, train = params.finetune, params.train
    dataset = artifacts.read_dataset()
    if not dataset:
        raise ShedError(f"{artifacts.DATASET}: the curated dataset is empty")
    model, tokenizer = load_causal_lm(cfg.model, cfg.device, cfg.dtype)
    trainer = LoraTrainer(model, tokenizer, train)
    steps = math.ceil(len(dataset) / train.batch_size) * train.epochs
    log.info("fine-tuning %s on %d records (%d steps)", cfg.model, len(dataset), steps)
    from dvclive import Live

    # dvclive writes into a scratch directory; only the finished curve moves into place (no half curve
    # after a crash). No timestamps, so a rerun writes the same bytes.
    with tempfile.TemporaryDirectory(prefix="shed-finetune-live-") as scratch:
        # Made from inside the scratch directory: dvclive then finds no DVC repository to tie the curve
        # to (the stage's own outputs are DVC's business), and works in a repo with no commit yet.
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            live = Live(dir=scratch, save_dvc_exp=False, dvcyaml=None, report=None)
        finally:
            os.chdir(cwd)
        with live, tqdm(total=steps, desc="finetune", unit="step") as bar:
            fit = trainer.fit(dataset, seed=train.seed, progress=bar, callback=Curve(live))
        with atomic_path(artifacts.FINETUNE_CURVE) as tmp:
            shutil.move(Path(live.plots_dir) / "metrics", tmp)
    with atomic_path(artifacts.FINETUNED) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    artifacts.write_metrics("finetune", {"records": len(dataset), "steps": fit["steps"],
                                         "train_loss": round(fit["loss"], 5), "seconds": round(fit["seconds"], 1)},
                            device=str(trainer.device))
    log.info("adapter -> %s/", artifacts.FINETUNED)
