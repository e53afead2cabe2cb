"""The embedded default's base model: a BPE tokenizer trained here and a tiny seeded Llama.

It stands in for LLaMA/Qwen/SmolLM on a laptop: well under 3M parameters, so a LoRA step takes well
under a second on 2 CPU cores. A brief causal-LM pretraining on generated text (word lists said twice, and a
question-answer side task outside the pool's skills) gives it a vocabulary, copying and
the answer format, so instruction tuning has a real effect to measure: which word a skill asks for.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from shed.config import BaseConfig
from shed.synthetic import pretraining_corpus

SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def tokenizer_corpus(seed: int) -> list[str]:
    """Text the tokenizer learns from: the pretraining text plus the instruction phrasings."""
    from shed.synthetic import FAMILIES

    phrasings = [t.replace("{}", "") for _, templates in FAMILIES.values() for t in templates]
    return pretraining_corpus(4000, seed) + phrasings * 20 + ["Question:", "Answer:", "Input:"] * 200


def build_model(cfg: BaseConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.heads, max_position_embeddings=cfg.max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def pack(corpus: list[str], tokenizer, block: int) -> torch.Tensor:
    """Concatenate the lines (EOS-separated) and cut into blocks of `block` tokens."""
    ids: list[int] = []
    for line in corpus:
        ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


def pretrain(model, blocks: torch.Tensor, cfg: BaseConfig, progress=None) -> list[float]:
    """Plain AdamW causal-LM training with cosine decay; returns the loss per step."""
    rng = np.random.default_rng([cfg.seed, 5])
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    total, warmup = max(cfg.pretrain_steps, 1), max(1, cfg.pretrain_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine decay to 0
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    model.train()
    losses = []
    for _ in range(cfg.pretrain_steps):
        batch = blocks[rng.choice(len(blocks), size=cfg.pretrain_batch_size, replace=len(blocks) < cfg.pretrain_batch_size)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
