"""How much the embedded default's base model depends on float rounding: one base pretraining under the
kernels this process gets, its final loss, eval accuracy and weights; the last line printed is one JSON object.

    python benchmarks/base_stability.py --dtype float64 --weights /tmp/a.npz
    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python benchmarks/base_stability.py --dtype float64 --weights /tmp/b.npz --compare /tmp/a.npz

Runs the base stage's recipe (params.yaml base.*) in --dtype, then scores the model (cast to float32, as
the stage saves it) on data/prepared/eval.jsonl (run `shed prepare` first): accuracy = argmax of the
choices' log-likelihoods. --compare gives the largest weight difference to another run's weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def accuracy(model, tokenizer, questions: list[dict]) -> float:
    """Share of questions whose gold choice has the highest log-likelihood."""
    import torch

    from shed.scoring import _continuation_logliks, context_and_choices

    pairs, owner = [], []
    for i, q in enumerate(questions):
        context, choices = context_and_choices(q)
        pairs += [(context, c) for c in choices]
        owner += [i] * len(choices)
    with torch.no_grad():
        logliks = _continuation_logliks(model, tokenizer, pairs, 64)
    scores: dict[int, list[float]] = {}
    for (value, _), i in zip(logliks, owner):
        scores.setdefault(i, []).append(value)
    return float(np.mean([int(np.argmax(scores[i])) == q["answer"] for i, q in enumerate(questions)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--steps", type=int, help="pretraining steps (default: params.yaml base.pretrain_steps)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--eval", default=str(ROOT / "data/prepared/eval.jsonl"))
    parser.add_argument("--weights", help="save the final weights here (.npz)")
    parser.add_argument("--compare", help="another run's --weights: report the largest difference")
    parser.add_argument("--load", metavar="WEIGHTS", help="skip pretraining: a run's --weights (same base params)")
    parser.add_argument("--finetune", action="store_true",
                        help="also LoRA fine-tune on the whole prepared pool (train.*) and score that (downstream)")
    args = parser.parse_args()

    import torch

    from shed import tiny
    from shed.config import load_params
    from shed.fileio import read_jsonl
    from shed.synthetic import pretraining_corpus

    cfg = load_params(args.params).base
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, pretrain_steps=args.steps)
    tokenizer = tiny.train_tokenizer(tiny.tokenizer_corpus(cfg.seed), cfg.vocab_size)
    model = tiny.build_model(cfg, tokenizer).to(getattr(torch, args.dtype))
    blocks = tiny.pack(pretraining_corpus(20_000, cfg.seed), tokenizer, block=64)
    start = time.perf_counter()
    if args.load:
        saved = np.load(args.load)
        model.load_state_dict({k: torch.from_numpy(saved[k]) for k in saved.files})
        losses = []
    else:
        losses = tiny.pretrain(model, blocks, cfg)
    seconds = time.perf_counter() - start
    model = model.float().eval()
    questions = read_jsonl(args.eval)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    out = {"benchmark": "base_stability", "dtype": args.dtype, "steps": cfg.pretrain_steps,
           "last_loss": round(losses[-1], 4) if losses else None,
           "eval_accuracy": round(accuracy(model, tokenizer, questions), 4),
           "seconds": round(seconds, 1), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "base": {k: getattr(cfg, k) for k in ("pretrain_lr", "seed")}}
    if args.finetune:
        from shed.training import LoraTrainer

        params = load_params(args.params)
        trainer = LoraTrainer(model, tokenizer, params.train)
        fit = trainer.fit(read_jsonl(ROOT / "data/prepared/pool.jsonl"), seed=params.train.seed)
        trainer.model.eval()
        out["finetuned_accuracy"] = round(accuracy(trainer.model, tokenizer, questions), 4)
        out["finetune_loss"] = round(fit["loss"], 4)
    if args.weights:
        np.savez(args.weights, **weights)
    if args.compare:
        other = np.load(args.compare)
        out["max_weight_difference"] = float(max(np.abs(weights[k] - other[k]).max() for k in other.files))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
