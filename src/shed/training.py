"""LoRA fine-tuning in-process: one base model, a fresh adapter per job, a plain seeded loop.

The base model and tokenizer are loaded once per stage; `LoraTrainer.fit` re-initialises the
adapter from the job's seed and trains it on the given records. A plain loop (not the HF
Trainer) keeps the per-job overhead to tokenisation lookups and optimizer creation.
"""

from __future__ import annotations

import hashlib
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

    def schedule(self, records: list[dict], seed: int) -> list[list[list[int]]]:
        """The recipe's data order: per optimizer step, its micro-batches as indices into `records`."""
        ids = [r["id"] for r in records]
        size = self.cfg.batch_size
        steps = []
        for epoch in range(self.cfg.epochs):
            order = epoch_order(ids, seed, epoch)
            steps += [[order[b:b + size]] for b in range(0, len(order), size)]
        return steps

    def optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW over the adapter, with linear warmup (a tenth of the steps) and linear decay to 0."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        warmup = max(1, total_steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
        return optimizer, scheduler

    def fit(self, records: list[dict], seed: int, progress=None, callback=None) -> dict:
        """Reset the adapter from `seed` and train it on `records`. Empty records: the base model.

        `callback.before_step(step, batches, lr)`, if given, sees each step's micro-batches (tensors)
        and learning rate with the model still at the parameters the step's gradients are taken at;
        `callback.after_step(step, loss, lr)` sees the step's training loss once it is applied.
        """
        start = time.perf_counter()
        self.reset(seed)
        self.model.eval()
        if not records:
            return {"steps": 0, "loss": float("nan"), "seconds": 0.0}
        encoded = [self.encode(r) for r in records]
        steps = self.schedule(records, seed)
        optimizer, scheduler = self.optimizer(len(steps))
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.model.train()
        losses = []
        for step, micro_batches in enumerate(steps):
            batches = [self._batch([encoded[i] for i in rows]) for rows in micro_batches]
            lr = scheduler.get_last_lr()[0]
            if callback is not None:
                callback.before_step(step, batches, lr)
            loss = sum(self.model(**batch).loss for batch in batches)
            loss.backward()
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if callback is not None:
                callback.after_step(step, losses[-1], lr)
            if progress is not None:
                progress.update(1)
        self.model.eval()
        per_epoch = len(steps) // self.cfg.epochs
        return {"steps": len(steps), "loss": float(np.mean(losses[-per_epoch:])),
                "seconds": time.perf_counter() - start}
