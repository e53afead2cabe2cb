"""What valuing every record costs against fine-tuning on them, timed in one process on one machine.

    shed fetch-model && python benchmarks/record_cost.py                 # SmolLM2-135M, 1,000 planted Alpaca records
    python benchmarks/record_cost.py --model models/base --pool-size 100 --epoch-steps 2   # the tiny model (dvc repro)

On the real-pool benchmark's pool (benchmarks/planting.py: seed 1, concentrated, loss kinds) and dev set (its
32 held-out Alpaca records), with real_quality.py's CPU recipe: the forward valuation of every record
(`shed.forward.value_forward`, k = 1: the base pass, the dev-set fit, the pass after it; nothing reused), then
--epoch-steps optimizer steps of a LoRA fine-tune on the pool with the same recipe, whose mean step time times
the epoch's steps (pool / batch size) estimates one epoch. Prints one JSON line: seconds of each part, the
epoch estimate, and their ratio (the valuation issue's bound: at most 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import tables  # benchmarks/, the script's own folder

tables.quiet_offline_env()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


class MemoryBook:
    """A `shed.forward.LossBook` that keeps nothing between runs: every loss is computed."""

    def __init__(self):
        self.known, self.fits = {}, {}

    def losses(self, key):
        return self.known.setdefault(key, {})

    def add_losses(self, key, ids, losses):
        self.losses(key).update(zip(ids, losses))

    def fit(self, run):
        return self.fits.get(run)

    def add_fit(self, summary, adapter):
        self.fits[summary.run] = (summary, adapter)


def main() -> None:
    import real_quality as rq
    from planting import dev_records, plant

    from shed import forward
    from shed.config import Params
    from shed.data import record_id
    from shed.models import load_causal_lm
    from shed.training import LoraTrainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(rq.SMOLLM2), help="a model directory (default: models/smollm2)")
    parser.add_argument("--pool-size", type=int, default=1000)
    parser.add_argument("--dev-size", type=int, default=32)
    parser.add_argument("--dev-epochs", type=int, default=rq.SMOLLM2_CPU["shapley.dev_epochs"])
    parser.add_argument("--epoch-steps", type=int, default=4, help="fine-tuning steps timed")
    args = parser.parse_args()

    alpaca = json.loads(rq.ALPACA.read_text(encoding="utf-8"))
    pool, _ = plant(alpaca, "concentrated", 1, args.pool_size, args.dev_size)
    pool = [{**r, "id": record_id(r["instruction"], r["input"], r["output"])} for r in pool]
    dev = [{**r, "id": record_id(r["instruction"], r["input"], r["output"])}
           for r in dev_records(alpaca, 1, args.pool_size, args.dev_size)]
    recipe = dataclasses.replace(Params().train, template="qa", max_length=rq.SMOLLM2_CPU["train.max_length"],
                                 epochs=1)
    model, tokenizer = load_causal_lm(args.model, "cpu", "auto")
    trainer = LoraTrainer(model, tokenizer, dataclasses.replace(recipe, epochs=args.dev_epochs))

    start = time.perf_counter()
    forward.value_forward(trainer, pool, dev, [0], MemoryBook(), recipe.micro_batch)
    valuation_s = time.perf_counter() - start

    trainer.cfg = recipe  # one epoch over the pool; time its first --epoch-steps steps
    steps = math.ceil(len(pool) / recipe.batch_size)
    start = time.perf_counter()
    trainer.fit(pool[: args.epoch_steps * recipe.batch_size], seed=recipe.seed)
    step_s = (time.perf_counter() - start) / args.epoch_steps
    epoch_s = step_s * steps
    print(json.dumps({"benchmark": "record_cost", "model": str(Path(args.model).name), "pool": len(pool),
                      "dev": len(dev), "dev_epochs": args.dev_epochs, "valuation_s": round(valuation_s, 1),
                      "finetune_step_s": round(step_s, 2), "finetune_epoch_steps": steps,
                      "finetune_epoch_s_estimate": round(epoch_s, 1), "valuation_over_epoch": round(valuation_s / epoch_s, 3),
                      "steps_timed": args.epoch_steps}), flush=True)


if __name__ == "__main__":
    main()
