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

Mid-fit checkpoints (`fit(checkpoint=...)`): the loop hands its whole state to a caller-supplied object
between steps and can pick it up again in a fresh process, ending with the same adapter bit for bit.
The state is plain tensors plus JSON-able metadata (`fit_state`), so the caller stores it without
pickle; this module does no file I/O.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from fractions import Fraction
from typing import Protocol

import numpy as np
import torch

from shed.config import TrainConfig
from shed.fileio import ShedError
from shed.prompts import spans, tokenize


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


class Checkpoint(Protocol):
    """What `LoraTrainer.fit(checkpoint=...)` needs from its caller, who does the storing.

    A state is `{"tensors": {name: tensor}, "meta": {JSON-able}}` (see `LoraTrainer.fit`)."""

    def load(self) -> dict | None:
        """The state saved earlier for this very fit, or None to start from its first step."""

    def save(self, state: dict) -> None:
        """Keep `state` (replacing any earlier one)."""

    def due(self, step: int) -> bool:
        """Whether to save now, with `step` steps taken (the next step's index)."""


STATE_VERSION = 1


def schedule_digest(records: list[dict], steps: list[list[list[int]]]) -> str:
    """A fingerprint of a fit's data order (record ids per micro-batch per step): a saved state
    belongs to one fit, and resuming another from it would silently mix two trainings."""
    ids = [[[records[i]["id"] for i in micro] for micro in step] for step in steps]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def encode_record(record: dict, tokenizer, template: str, max_length: int | None,
                  responses_only: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a record as `prompts.spans` renders it and `prompts.tokenize` tokenises it: the
    prompt, then the response plus EOS (a conversation: every exchange, each reply labelled), labels -100 off
    the replies when `responses_only`; cut at `max_length` (None or 0: uncut). The cut keeps the start: a
    single-turn record loses the end of its response, a conversation its later turns first."""
    ids, labels = tokenize(tokenizer, spans(record, template, tokenizer), responses_only)
    cut = max_length or None
    return ids[:cut], labels[:cut]


def longest_encoding(records, tokenizer, template: str, max_length: int | None) -> int:
    """Tokens of the longest of `records` as `encode_record` cuts them (0 for none): what a micro-batch of them
    is padded to at most, for the memory estimate (shed.memory)."""
    return max((len(encode_record(r, tokenizer, template, max_length)[0]) for r in records), default=0)


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_token_id: int | None, device=None) -> dict[str, torch.Tensor]:
    """(input_ids, labels) rows as right-padded tensors: pad id, labels -100 and attention mask 0 past each row."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id or 0, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


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
        self._encoded_by_cut = {self.max_length: self._encoded}  # `cut_at`: each cut's encodings apart

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for a record, cached by record id (records recur across jobs)."""
        cached = self._encoded.get(record["id"])
        if cached is not None:
            return cached
        if self.length_problem:
            raise ShedError(self.length_problem)
        ids, labels = encode_record(record, self.tokenizer, self.cfg.template, self.max_length, self.cfg.responses_only)
        self._encoded[record["id"]] = (ids, labels)
        return ids, labels

    @contextlib.contextmanager
    def cut_at(self, max_length: int | None):
        """Inside the block, records are encoded, trained on and scored (`max_length`) cut at the smaller of
        `max_length` and the recipe's cut (None or 0: the recipe's own): forward's dev-set fit under
        shapley.dev_max_length. Each cut's encodings are cached apart."""
        cut = min([n for n in (self.max_length, max_length) if n], default=0)
        saved = self.max_length, self._encoded
        self.max_length, self._encoded = cut, self._encoded_by_cut.setdefault(cut, {})
        try:
            yield
        finally:
            self.max_length, self._encoded = saved

    def reset(self, seed: int) -> None:
        """A fresh adapter, initialised from `seed` alone (LoRA B = 0, so it starts as the base model)."""
        from peft.tuners.lora import LoraLayer

        torch.manual_seed(seed)
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", init_lora_weights=True)

    def _batch(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return pad_rows(rows, self.tokenizer.pad_token_id, self.device)

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

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The adapter's parameters by name, in model order (what the optimizer trains)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def fit(self, records: list[dict], seed: int, progress=None, callback=None, checkpoint: Checkpoint | None = None,
            reset: bool = True) -> dict:
        """Reset the adapter from `seed` and train it on `records`. Empty records: the base model. `reset=False`
        trains on from the adapter as it is (after a warm-up fit), with a fresh optimizer and schedule.

        `callback.before_step(step, batches, lr)`, if given, sees each step's micro-batches (tensors)
        and learning rate with the model still at the parameters the step's gradients are taken at;
        `callback.after_step(step, loss, lr)` sees the step's training loss once it is applied. The
        step's loss (and gradient) is the `step_weights`-weighted sum over its micro-batches.
        `before_step` may return `(loss, grad)`: the step's loss and its gradient by parameter name
        (`trainable`), the token-weighted sum of its micro-batches' gradients. The loop then takes that
        gradient as the step's and runs no forward/backward of its own (without a GradScaler only: a
        scaled backward is another gradient); it returns None to leave the step to the loop.

        `checkpoint` (`Checkpoint`): its `load()` state, if any, resumes the fit at the step after it;
        after each step but the last, `due(steps taken)` asks whether to `save` the state:
        `{"tensors": {...}, "meta": {...}}` holding the adapter, AdamW's state, the scheduler's, the
        GradScaler's, the torch RNG states (CPU, and the device's on CUDA), the losses so far, the
        next step's index and, from `callback.state()`, the callback's own (restored by
        `callback.load_state(state)`). A resumed fit ends as the uninterrupted one would, bit for bit; a
        callback with `resumed(losses)` is given the restored steps' losses (step 0 on) before the first new step.
        Returns {"steps", "loss" (mean over the last epoch), "seconds" (this call's and the resumed
        state's), "resumed_from" (the first step this call took)}.
        """
        start = time.perf_counter()
        if reset:
            self.reset(seed)
        else:
            torch.manual_seed(seed)  # the data-dependent draws (dropout) as a reset fit's
        self.model.eval()
        if not records:
            return {"steps": 0, "loss": float("nan"), "losses": [], "seconds": 0.0, "resumed_from": 0}
        if checkpoint is not None and callback is not None \
                and not (hasattr(callback, "state") and hasattr(callback, "load_state")):
            raise TypeError("fit(checkpoint=...): the callback has no state()/load_state(), so it could not resume")
        encoded = [self.encode(r) for r in records]
        steps = self.schedule(records, seed)
        optimizer, scheduler = self.optimizer(len(steps))
        params = [p for group in optimizer.param_groups for p in group["params"]]
        named = self.trainable()
        # fp16 base weights only: loss scaling, starting low (2^10, not torch's 2^16) because a job has few
        # steps and each overflow skips one while the scale halves.
        scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**10) if self.scale_loss else None
        digest = schedule_digest(records, steps) if checkpoint is not None else ""
        first, losses, earlier = 0, [], 0.0
        state = checkpoint.load() if checkpoint is not None else None
        if state is not None:
            first, losses, earlier = self._restore(state, seed, len(steps), digest, optimizer, scheduler, scaler,
                                                   callback)
            if progress is not None and first:
                progress.update(first)
            if hasattr(callback, "resumed"):
                callback.resumed(list(losses))
        self.model.train()
        for step in range(first, len(steps)):
            batches = [self._batch([encoded[i] for i in rows]) for rows in steps[step]]
            lr = scheduler.get_last_lr()[0]
            given = callback.before_step(step, batches, lr) if callback is not None else None
            if given is not None and scaler is None:
                # The callback's per-example pass already summed this step's gradient: a second
                # forward/backward of the same batch would only recompute it (up to rounding).
                loss, grad = given
                for name, p in named:
                    p.grad = grad[name].detach().to(p.dtype).clone()
            else:
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
            losses.append(float(loss))
            if callback is not None:
                callback.after_step(step, losses[-1], lr)
            if progress is not None:
                progress.update(1)
            if checkpoint is not None and step + 1 < len(steps) and checkpoint.due(step + 1):
                checkpoint.save(self.fit_state(step + 1, seed, len(steps), digest, optimizer, scheduler, scaler,
                                               losses, callback, earlier + time.perf_counter() - start))
        self.model.eval()
        per_epoch = len(steps) // self.cfg.epochs
        return {"steps": len(steps), "loss": float(np.mean(losses[-per_epoch:])), "losses": list(losses),
                "seconds": earlier + time.perf_counter() - start, "resumed_from": first}

    def fit_state(self, step: int, seed: int, total: int, digest: str, optimizer, scheduler, scaler,
                  losses: list[float], callback, seconds: float) -> dict:
        """The loop's state between steps (`step` taken) as {"tensors": name -> tensor, "meta": JSON-able}.
        Tensors are copies: training on does not change a state already handed out."""
        tensors = {f"adapter/{n}": p.detach().clone() for n, p in self.trainable()}
        saved = optimizer.state_dict()
        scalars = {}
        for index, per in saved["state"].items():
            for key, value in per.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{key}"] = value.detach().clone()
                else:
                    scalars[f"{index}/{key}"] = value
        tensors["rng/cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
        meta = {"version": STATE_VERSION, "step": step, "steps": total, "seed": seed, "schedule": digest,
                "optimizer": {"param_groups": saved["param_groups"], "scalars": scalars},
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                "seconds": seconds, "callback": None}
        if callback is not None:
            own = callback.state()
            tensors.update({f"callback/{k}": v for k, v in own["tensors"].items()})
            meta["callback"] = own["meta"]
        return {"tensors": tensors, "meta": json.loads(json.dumps(meta))}  # tuples as lists, as a store reads them

    def _restore(self, state: dict, seed: int, total: int, digest: str, optimizer, scheduler, scaler,
                 callback) -> tuple[int, list[float], float]:
        """Put `fit_state`'s state back; returns (next step, losses so far, seconds spent before)."""
        tensors, meta = state["tensors"], copy.deepcopy(state["meta"])
        problem = ("another version" if meta.get("version") != STATE_VERSION
                   else "another seed" if meta.get("seed") != seed
                   else "another number of steps" if meta.get("steps") != total
                   else "another data order" if meta.get("schedule") != digest
                   else "no step to resume at" if not 0 < meta.get("step", 0) < total else None)
        if problem:
            raise ValueError(f"fit checkpoint: not a state of this fit ({problem})")
        named = self.trainable()
        adapter = {k[len("adapter/"):]: v for k, v in tensors.items() if k.startswith("adapter/")}
        if sorted(adapter) != sorted(n for n, _ in named) \
                or any(adapter[n].shape != p.shape for n, p in named):
            raise ValueError("fit checkpoint: its adapter is not this model's")
        with torch.no_grad():
            for name, p in named:
                p.copy_(adapter[name])
        groups = meta["optimizer"]["param_groups"]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                per_param.setdefault(int(index), {})[name] = value
        for key, value in meta["optimizer"]["scalars"].items():
            index, name = key.split("/", 1)
            per_param.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
        scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(meta["scaler"])
        # Dropout masks (LoRA dropout, the callback's passes) draw from these: without them a resumed
        # fit with dropout would train on other masks than the uninterrupted one.
        torch.set_rng_state(tensors["rng/cpu"])
        if self.device.type == "cuda" and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        if callback is not None:
            callback.load_state({"tensors": {k[len("callback/"):]: v for k, v in tensors.items()
                                             if k.startswith("callback/")},
                                 "meta": meta["callback"]})
        return int(meta["step"]), [float(x) for x in tensors["losses"].tolist()], float(meta["seconds"])
