"""base: build the embedded default's base model (a tiny Llama and its BPE tokenizer) -> models/base.

    shed base                          # params.yaml: base.*, shapley.model, finetune.model

Built only when a configured model is models/base: shapley.model (the value model, which the sample stage
also scores the pool with) or finetune.model (fine-tuned, and scored by evaluate). When both name another
model (a hub id, SmolLM2, ...), nothing is built or pretrained: models/base holds only skipped.json, saying
why, and a stage that loads it as a model stops with a one-line error (`shed.models`). DVC still has its out,
and a later change of either key back to models/base reruns this stage, which then builds it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shed import artifacts
from shed.config import Params
from shed.fileio import atomic_path, write_json

log = logging.getLogger(__name__)


def base_model_users(params: Params) -> list[str]:
    """The params keys whose model is models/base (as a path: `./models/base` and its absolute path count)."""
    here = Path(artifacts.BASE_MODEL).resolve()
    return [key for key, model in (("shapley.model", params.shapley.model), ("finetune.model", params.finetune.model))
            if Path(model).expanduser().resolve() == here]


def main(params: Params) -> None:
    if base_model_users(params):
        build(params)
        return
    reason = (f"no configured model is {artifacts.BASE_MODEL} (shapley.model: {params.shapley.model}, "
              f"finetune.model: {params.finetune.model}), so it was not built")
    with atomic_path(artifacts.BASE_MODEL) as tmp:
        tmp.mkdir()
        write_json(tmp / Path(artifacts.BASE_SKIPPED).name, {"reason": reason})
    artifacts.write_metrics("base", {"skipped": reason})
    log.info("base model: %s -> %s", reason, artifacts.BASE_SKIPPED)


def build(params: Params) -> None:
    """Train the tokenizer, build the tiny Llama, pretrain it; write it to models/base."""
    from tqdm import tqdm

    from shed import tiny
    from shed.synthetic import pretraining_corpus

    cfg = params.base
    tokenizer = tiny.train_tokenizer(tiny.tokenizer_corpus(cfg.seed), cfg.vocab_size)
    model = tiny.build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny Llama: %.2fM parameters, vocabulary %d", n_params / 1e6, len(tokenizer))
    losses = []
    if cfg.pretrain_steps:
        blocks = tiny.pack(pretraining_corpus(20_000, cfg.seed), tokenizer, block=64)
        with tqdm(total=cfg.pretrain_steps, desc="pretrain base", unit="step") as bar:
            losses = tiny.pretrain(model, blocks, cfg, progress=bar)
    with atomic_path(artifacts.BASE_MODEL) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    artifacts.write_metrics("base", {"parameters": n_params, "pretrain_steps": cfg.pretrain_steps,
                                     "pretrain_loss": round(losses[-1], 4) if losses else None})
    log.info("base model -> %s/", artifacts.BASE_MODEL)
