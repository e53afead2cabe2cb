"""base: build the embedded default's base model (a tiny Llama and its BPE tokenizer) -> models/base.

    shed base                          # params.yaml: base.*

Users with a GPU point shapley.model / finetune.model at a hub id or local path instead; this
stage then still runs (seconds) but nothing reads its output.
"""

from __future__ import annotations

import logging

from tqdm import tqdm

from shed import artifacts, tiny
from shed.config import Params
from shed.fileio import atomic_path
from shed.synthetic import pretraining_corpus

log = logging.getLogger(__name__)


def main(params: Params) -> None:
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
