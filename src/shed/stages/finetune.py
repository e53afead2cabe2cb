"""finetune: LoRA fine-tune finetune.model on the curated dataset -> models/finetuned (a PEFT adapter).

    shed finetune                      # params.yaml: finetune.*, train.*
    # finetune.model may differ from shapley.model: the paper's transferability experiment.

Trains on the curated records as shed normalised them: the ids of data/curated/records.jsonl joined with
data/prepared/pool.jsonl (data/curated/dataset.jsonl holds the user's own rows). The training curve (loss and
learning rate) is logged with dvclive as each optimizer step happens, one row per step, into
dvclive/finetune/plots/metrics/{loss,lr}.tsv, which dvc.yaml declares as plots: `dvc plots show` while it runs
or after, `dvc plots diff <exp>`. The adapter is the DVC artifact `finetuned-adapter` (dvc.yaml).

Before the model loads, its peak memory is estimated (shed.memory) and the stage stops with a one-line error
naming the settings to lower when it does not fit.
"""

from __future__ import annotations

import logging
import math

from tqdm import tqdm

from shed import artifacts, curves, memory
from shed.config import Params
from shed.fileio import ShedError, atomic_path
from shed.models import load_causal_lm, load_tokenizer, resolve_device
from shed.training import LoraTrainer, longest_encoding

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    cfg, train = params.finetune, params.train
    dataset = artifacts.read_curated()
    if not dataset:
        raise ShedError(f"{artifacts.CURATED_RECORDS}: the curated dataset is empty")
    device, shape = resolve_device(cfg.device), memory.read_shape(cfg.model)
    limit = train.max_length or (shape.max_positions if shape else 0) or 0
    memory.check("finetune", cfg.model, shape, device, lambda n: memory.finetune_estimate(params, shape, device, n),
                 limit, lambda: longest_encoding(dataset, load_tokenizer(cfg.model), train.template, limit))
    model, tokenizer = load_causal_lm(cfg.model, cfg.device, cfg.dtype)
    trainer = LoraTrainer(model, tokenizer, train)
    steps = math.ceil(len(dataset) / train.batch_size) * train.epochs
    log.info("fine-tuning %s on %d records (%d steps)", cfg.model, len(dataset), steps)
    with curves.live_steps(artifacts.FINETUNE_CURVE) as live, tqdm(total=steps, desc="finetune", unit="step") as bar:
        fit = trainer.fit(dataset, seed=train.seed, progress=bar, callback=curves.StepCurve(live))
    with atomic_path(artifacts.FINETUNED) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    artifacts.write_metrics("finetune", {"records": len(dataset), "steps": fit["steps"],
                                         "train_loss": round(fit["loss"], 5), "seconds": round(fit["seconds"], 1)},
                            device=str(trainer.device))
    log.info("adapter -> %s/", artifacts.FINETUNED)
