"""LoRA fine-tuning in-process: one base model, a fresh adapter per job, a plain seeded loop.

The base model and tokenizer are loaded once per stage; `LoraTrainer.fit` re-initialises the
adapter from the job's seed and trains it on the given records. A plain loop (not the HF
Trainer) keeps the per-job overhead to tokenisation lookups and optimizer creation.
"""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import torch

from shed.config import TrainConfig
from shed.prompts import render


def epoch_order(ids: list[str], seed: int, epoch: int) -> list[int]:
    """A seeded shuffle keyed by record id: adding a record to a training set leaves the others in
    the same relative order, so two subsets' fine-tunes differ by their data, not by the draw."""
    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{epoch}:{ids[i]}".encode(), digest_size=8).digest()

    return sorted(range(len(ids)), key=key)


class LoraTrainer:
    def __init__(self, model, tokenizer, cfg: TrainConfig):
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        targets = [t for t in cfg.lora.target_modules if any(name.endswith(t) for name, _ in model.named_modules())]
        if not targets:
            from shed.fileio import ShedError

            raise ShedError(f"train.lora.target_modules: none of {cfg.lora.target_modules} exist in this model")
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        # peft keeps the targets as a set, which saves in a per-process order: sort them so the
        # saved adapter_config.json (a DVC output) is byte-identical across runs.
        self.model.peft_config["default"].target_modules = sorted(targets)
        self._encoded: dict[str, tuple[list[int], list[int]]] = {}

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for a record, cached by record id (records recur across jobs)."""
        cached = self._encoded.get(record["id"])
        if cached is not None:
            return cached
        tok = self.tokenizer
        prompt, response = render(record, self.cfg.template, tok)
        # No BOS added: lm-eval scores causal LMs without one, and training must match scoring.
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tok(response, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            response_ids = response_ids + [tok.eos_token_id]
        ids = (prompt_ids + response_ids)[: self.cfg.max_length]
        labels = ([-100] * len(prompt_ids) if self.cfg.responses_only else list(prompt_ids)) + response_ids
        labels = labels[: self.cfg.max_length]
        self._encoded[record["id"]] = (ids, labels)
        return ids, labels

    def reset(self, seed: int) -> None:
        """A fresh adapter, initialised from `seed` alone (LoRA B = 0, so it starts as the base model)."""
        from peft.tuners.lora import LoraLayer

        torch.manual_seed(seed)
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", init_lora_weights=True)

    def _batch(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids.to(self.device), "labels": labels.to(self.device),
                "attention_mask": mask.to(self.device)}

    def fit(self, records: list[dict], seed: int, progress=None) -> dict:
        """Reset the adapter from `seed` and train it on `records`. Empty records: the base model."""
        start = time.perf_counter()
        self.reset(seed)
        self.model.eval()
        if not records:
            return {"steps": 0, "loss": float("nan"), "seconds": 0.0}
        encoded = [self.encode(r) for r in records]
        cfg = self.cfg
        steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        warmup = max(1, total // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
        ids = [r["id"] for r in records]
        self.model.train()
        losses = []
        for epoch in range(cfg.epochs):
            order = epoch_order(ids, seed, epoch)
            for b in range(steps_per_epoch):
                batch = self._batch([encoded[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]])
                loss = self.model(**batch).loss
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if progress is not None:
                    progress.update(1)
        self.model.eval()
        return {"steps": total, "loss": float(np.mean(losses[-steps_per_epoch:])),
                "seconds": time.perf_counter() - start}
