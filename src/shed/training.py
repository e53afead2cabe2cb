"""LoRA fine-tuning in-process: one base model, a fresh adapter per job, a plain seeded loop.

The base model and tokenizer are loaded once per stage; `LoraTrainer.fit` re-initialises the
adapter from the job's seed and trains it on the given records. A plain loop (not the HF
Trainer) keeps the per-job overhead to tokenisation lookups and optimizer creation.

The recipe (train.* in params.yaml) in the loop's terms:
- a step takes `batch_size` records (the last of an epoch fewer) and is run as micro-batches of
  `micro_batch_size`; each micro-batch's mean loss is weighted by its share of the step's label
  tokens, so the accumulated gradient is the gradient of the step's mean loss over all its label
  tokens, what one full batch gives (Hugging Face's causal-LM loss), up to float rounding. Clipping,
  the optimizer and the scheduler act once per step. With one micro-batch (the default) the loop
  is the plain one, bit for bit.
- `group_by_length` reorders records within a step only: each step keeps its records (so its update),
  micro-batches get records of similar length (less padding).
- precision (shed.models): base weights as loaded (bf16 on CUDA, fp32 on CPU), LoRA weights and
  optimizer states fp32, forward passes under autocast to a half-precision base's dtype.
- `gradient_checkpointing`: non-reentrant activation checkpointing of each decoder layer; the
  backward recomputes each layer's forward (module forward hooks do not fire again in the recompute).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from fractions import Fraction

import numpy as np
import torch

from shed.config import TrainConfig
from shed.fileio import ShedError
from shed.prompts import render


def epoch_order(ids: list[str], seed: int, epoch: int) -> list[int]:
    """A seeded shuffle keyed by record id: adding a record to a training set leaves the others in
    the same relative order, so two subsets' fine-tunes differ by their data, not by the draw."""
    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{epoch}:{ids[i]}".encode(), digest_size=8).digest()

    return sorted(range(len(ids)), key=key)


def warmup_steps(total_steps: int, ratio: float) -> int:
    """floor(total_steps x ratio), at least 1, with the ratio taken as the decimal it is written as
    (0.1 is exactly 1/10), so ratio 0.1 gives total_steps // 10 for every total, the warmup before
    warmup_ratio existed. (The HF Trainer rounds up: it can warm up one step longer.)"""
    return max(1, math.floor(Fraction(str(ratio)) * total_steps))


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens a batch's causal-LM loss averages over: labels other than -100 after the first position
    (the loss predicts token t+1 from positions up to t)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def step_weights(batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Each micro-batch's weight in its step's loss: its share of the step's label tokens (1.0 for a
    step of one micro-batch). The step's loss is the weighted sum of the micro-batches' mean losses."""
    if len(batches) == 1:
        return [1.0]
    tokens = [label_tokens(b) for b in batches]
    total = sum(tokens)
    return [n / total if total else 0.0 for n in tokens]


class LoraTrainer:
    def __init__(self, model, tokenizer, cfg: TrainConfig):
        from peft import LoraConfig, get_peft_model

        from shed.models import autocast_dtype, max_positions, needs_grad_scaler, upcast_trainable

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        # max_length against the model's own limit: refused at the first record encoded (a trainer that only
        # saves an adapter, or fits nothing, never needs a length).
        limit = max_positions(model)
        self.length_problem = None
        if cfg.max_length and limit and cfg.max_length > limit:
            self.length_problem = (f"train.max_length: {cfg.max_length} exceeds the model's own limit of {limit} "
                                   "tokens (max_position_embeddings)")
        elif not (cfg.max_length or limit):
            self.length_problem = "train.max_length: 0 (the model's own) but the model's config names no position limit"
        self.max_length = cfg.max_length or limit or 0
        targets = [t for t in cfg.lora.target_modules if any(name.endswith(t) for name, _ in model.named_modules())]
        if not targets:
            raise ShedError(f"train.lora.target_modules: none of {cfg.lora.target_modules} exist in this model")
        if cfg.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            try:
                if enable is not None:
                    enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            except ValueError as exc:
                raise ShedError(f"train.gradient_checkpointing: {exc}") from None
        # The precision policy (shed.models.autocast_dtype): read off the base weights before the adapter exists.
        self.autocast = autocast_dtype(model)
        self.scale_loss = needs_grad_scaler(model)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        upcast_trainable(self.model)  # LoRA weights (and so the optimizer's states) in fp32
        # peft keeps the targets as a set, which saves in a per-process order: sort them so the
        # saved adapter_config.json (a DVC output) is byte-identical across runs.
        self.model.peft_config["default"].target_modules = sorted(targets)
        self._encoded: dict[str, tuple[list[int], list[int]]] = {}

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for a record, cached by record id (records recur across jobs)."""
        cached = self._encoded.get(record["id"])
        if cached is not None:
            return cached
        if self.length_problem:
            raise ShedError(self.length_problem)
        tok = self.tokenizer
        prompt, response = render(record, self.cfg.template, tok)
        # No BOS added: lm-eval scores causal LMs without one, and training must match scoring.
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tok(response, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            response_ids = response_ids + [tok.eos_token_id]
        ids = (prompt_ids + response_ids)[: self.max_length]
        labels = ([-100] * len(prompt_ids) if self.cfg.responses_only else list(prompt_ids)) + response_ids
        labels = labels[: self.max_length]
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
        """The recipe's data order: per optimizer step, its micro-batches as indices into `records`.

        Each epoch visits the records in `epoch_order` and cuts that order into steps of
        `batch_size`; each step is cut into micro-batches of `micro_batch_size` (the last smaller).
        With `group_by_length`, a step's records are first sorted by token length, longest first
        (ties in epoch order): each step holds the same records, only their micro-batches change."""
        ids = [r["id"] for r in records]
        size, micro = self.cfg.batch_size, self.cfg.micro_batch
        lengths = [len(self.encode(r)[0]) for r in records] if self.cfg.group_by_length and micro < size else None
        steps = []
        for epoch in range(self.cfg.epochs):
            order = epoch_order(ids, seed, epoch)
            for b in range(0, len(order), size):
                rows = order[b:b + size]
                if lengths is not None:
                    rows = sorted(rows, key=lambda i: -lengths[i])  # stable: equal lengths keep the epoch order
                steps.append([rows[m:m + micro] for m in range(0, len(rows), micro)])
        return steps

    def optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW over the adapter, with linear warmup (`warmup_steps`: warmup_ratio of the steps) and
        linear decay to 0."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        warmup = warmup_steps(total_steps, self.cfg.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
        return optimizer, scheduler

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def backward(self, batches: list[dict[str, torch.Tensor]], scaler=None) -> float:
        """Accumulate one step's gradient into the adapter's .grad, micro-batch by micro-batch (each
        weighted by `step_weights`), and return the step's loss: the mean over all its label tokens.
        A micro-batch without label tokens adds nothing (as its rows add nothing to a full batch)."""
        weights = step_weights(batches)
        total = 0.0
        for batch, weight in zip(batches, weights):
            if not weight and len(batches) > 1:
                continue
            with self._autocast():
                loss = self.model(**batch, use_cache=False).loss
            if len(batches) > 1:
                loss = loss * weight
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.item()
        return total if any(weights) else float("nan")

    def fit(self, records: list[dict], seed: int, progress=None, callback=None) -> dict:
        """Reset the adapter from `seed` and train it on `records`. Empty records: the base model.

        `callback.before_step(step, batches, lr)`, if given, sees each step's micro-batches (tensors)
        and learning rate with the model still at the parameters the step's gradients are taken at;
        `callback.after_step(step, loss, lr)` sees the step's training loss once it is applied. The
        step's loss (and gradient) is the `step_weights`-weighted sum over its micro-batches.
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
        # fp16 base weights only: loss scaling, starting low (2^10, not torch's 2^16) because a job has few
        # steps and each overflow skips one while the scale halves.
        scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**10) if self.scale_loss else None
        self.model.train()
        losses = []
        for step, micro_batches in enumerate(steps):
            batches = [self._batch([encoded[i] for i in rows]) for rows in micro_batches]
            lr = scheduler.get_last_lr()[0]
            if callback is not None:
                callback.before_step(step, batches, lr)
            loss = self.backward(batches, scaler)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            if callback is not None:
                callback.after_step(step, losses[-1], lr)
            if progress is not None:
                progress.update(1)
        self.model.eval()
        per_epoch = len(steps) // self.cfg.epochs
        return {"steps": len(steps), "loss": float(np.mean(losses[-per_epoch:])),
                "seconds": time.perf_counter() - start}
