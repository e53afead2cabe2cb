"""In-run (gradient) Shapley: value training examples inside one training run (SPEC.md, last section).

At step t the first-order drop of dev question q's loss that training example z_i causes is
`η_t · ⟨∇ℓ(z_i; θ_t), ∇ℓ(q; θ_t)⟩` (positive: z_i lowers the loss of q, i.e. raises its gold
log-likelihood), with ℓ(z_i) example i's share of the batch loss, so that Σ_i ∇ℓ(z_i) is the batch
gradient and a step's credits add up to the step's first-order change. Pure math, no file I/O:
the shapley stage runs the loop, this module computes each step's credits and accumulates them.

Gradient products. Hand-written: docs/engine.md ("Libraries") says why not dattri-llm or bergson, and
tests/test_inrun_parity.py checks these gradients and credits against dattri-llm's hooks. opacus needs
its own module wrapper and knows nothing of PEFT; torch.func's vmap over a Hugging Face model breaks on
its data-dependent mask code. The hooks sit on every trainable `nn.Linear` (a PEFT LoRA layer's
`lora_A.default` and `lora_B.default`): the layer's input a (tokens x in) and the gradient g at its
output (tokens x out) give example n's gradient `Σ_t g_{n,t} ⊗ a_{n,t}` exactly (peft's dropout and
scaling are inside a and g, since the hooks sit on A and B themselves).
These per-example gradients are formed for the LoRA matrices only (r x in, out x r), never for the
base model. "Ghost" products (Σ_{t,s} (g_{i,t}·g_{q,s})(a_{i,t}·a_{q,s})) would skip forming them,
but cost T_i·T_q·(in+out) per pair against r·(in+out) per example here: for LoRA ranks the per-
example gradient is the smaller object, and having it also allows an elementwise (Adam)
preconditioner, which ghost products cannot apply. Dev gradients are contracted with the training
gradients layer by layer as they arrive, so the dev set's gradients are never all held at once;
with `dev_every` N > 1 they are held instead (n_dev x LoRA parameters), refreshed every N steps
and reused in between (TracIn-checkpoint style: a training step's gradient at θ_t meets the dev
gradients of θ at the last refresh), which saves N - 1 of every N dev passes. A dev pass takes the
dev set in chunks of at most `dev_chunk` items and `dev_tokens` padded tokens (`dev_chunks`): what a
pass holds grows with its tokens, and a dev item is scored on its whole response (up to the stage's
cap, shapley.dev_max_length), often far longer than a training record (docs/engine.md#memory).

One pass per step. The training micro-batches' per-example gradients sum to the step's gradient, so
`CreditCallback.before_step` hands that gradient to `LoraTrainer.fit`, which then skips its own
forward/backward of the same batch.

Update direction. The default credit uses the plain SGD direction, η_t times the gradient: it is
what SPEC.md states as exact for SGD (linear in the batch, so a step's credits add up to its
first-order term) and what In-Run Data Shapley derives. η_t is the caller's choice; the natural one
is the scheduler's current learning rate times the clip coefficient of the step (`clip_coefficient`),
which is the scale of the step actually taken. The training itself uses AdamW, whose update is not
linear in the batch; `adam_preconditioner` gives the explicit alternative, LESS-style: each
gradient divided elementwise by Adam's bias-corrected second moment at this step,
`1/(sqrt(v̂_t)+ε)`, momentum left out (an example's gradient enters this step's update with weight
(1-β1)/(1-β1^t) and later ones with weights summing to about 1 - that: crediting it with weight 1 now
folds its delayed share into this step). Weight decay moves no data, so it is credited to no one.

Rows must be independent in the forward pass (no batch norm): true of causal LMs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from shed.memory import chunks
from shed.prompts import spans
from shed.scoring import cut_labelled, dev_kind, gold_rows, response_rows
from shed.shapley import Player, ShapleyResult, _stderr_of, _value

Batch = dict[str, torch.Tensor]  # input_ids, labels, attention_mask (training.pad_rows)
Grads = dict[str, torch.Tensor]  # parameter name -> tensor (per example: a leading example axis)

log = logging.getLogger(__name__)


# --- batches -------------------------------------------------------------------------------------

def dev_rows(tokenizer, dev: list[dict], template: str | None = None, max_length: int | None = None
             ) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per dev item, tokenised as the shapley.value loglik scores it, the loss on
    the scored part only. A question (`scoring.gold_rows`): the context "Question: ...\\nAnswer:" and the
    gold continuation " choice", no BOS, no EOS. An instruction record (`scoring.response_rows`): its
    spans by `prompts.spans` under `template` (train.template; required for records), each reply
    labelled and followed by EOS. Each cut at `max_length` tokens (`scoring.cut_labelled`; None: uncut). With
    reduction "example" a row's loss is minus the item's own per-token log-likelihood
    (`scoring.gold_loglik`'s or `scoring.response_loglik`'s per-item score)."""
    if dev_kind(dev) == "records":
        if template is None:
            raise ValueError("dev_rows: instruction records are prompted as training prompts them: pass train.template")
        rows = response_rows(tokenizer, [spans(r, template, tokenizer) for r in dev])
    else:
        rows = [(c + t, [-100] * len(c) + t) for c, t in gold_rows(tokenizer, dev)]
    return cut_labelled(rows, max_length)


def response_tokens(batch: Batch) -> np.ndarray:
    """Tokens each row's loss is taken over (labels other than -100 after the first position)."""
    return (batch["labels"][:, 1:] != -100).sum(1).cpu().numpy()


def token_weights(batch: Batch) -> np.ndarray:
    """Each dev item's share of the dev set's scored tokens: the whole-dev loglik (`gold_loglik`,
    `response_loglik`) is the token-weighted mean of the per-item scores, so its credit is this weighting
    of per-item credits."""
    n = response_tokens(batch).astype(float)
    return n / max(n.sum(), 1.0)


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows start:stop of a batch, trimmed of the columns that are padding in all of them."""
    part = {k: v[start:stop] for k, v in batch.items()}
    width = int(part["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in part.items()}


def dev_chunks(dev_batch: Batch, dev_chunk: int = 0, dev_tokens: int = 0) -> list[tuple[int, int]]:
    """(start, stop) of the dev passes over `dev_batch`: at most `dev_chunk` items (0: any number) and
    `dev_tokens` padded tokens (0: any) a pass (`memory.chunks`); an item's loss and gradient do not depend on
    its chunk beyond float rounding."""
    return chunks(dev_batch["attention_mask"].sum(1).tolist(), dev_chunk, dev_tokens)


# --- per-example gradients -----------------------------------------------------------------------

def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters, in model order: each must be the weight or bias of an `nn.Linear`
    (a LoRA A or B), since only those get per-example gradients. Raises ValueError otherwise (DoRA
    magnitudes, LoRA on embeddings, modules_to_save), rather than leaving a parameter out silently."""
    covered = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    covered[f"{name}.{pname}"] = p
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, _ in trainable if n not in covered]
    if missing:
        raise ValueError(f"in-run credits need every trainable parameter in an nn.Linear; not: {missing[:3]}")
    if not trainable:
        raise ValueError("the model has no trainable parameters (no LoRA adapter?)")
    return trainable


def _linear_modules(model) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(p.requires_grad for p in m.parameters(recurse=False))}


def _row_losses(model, batch: Batch, reduction: str) -> torch.Tensor:
    """Per-row losses ℓ_n of a batch (next-token NLL over labels != -100), in at least float32.

    reduction "batch": ℓ_n = row n's summed NLL / the batch's label tokens, so Σ_n ℓ_n is the loss
    Hugging Face computes for the batch (its mean over all label tokens). "example": ℓ_n = row n's
    mean NLL over its own label tokens (a dev question's loss: minus its per-question gold_loglik).
    A row without label tokens has ℓ_n = 0 (and no gradient)."""
    if reduction not in ("batch", "example"):
        raise ValueError(f"reduction must be 'batch' or 'example', not {reduction!r}")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=-100, reduction="none").view(labels.shape)
    tokens = (labels != -100).sum(1)
    if reduction == "batch":
        return nll.sum(1) / max(int(tokens.sum()), 1)
    return nll.sum(1) / tokens.clamp(min=1)


def _backward_per_example(model, batch: Batch, reduction: str,
                          sink: Callable[[str, torch.Tensor], None]) -> tuple[torch.Tensor, Grads]:
    """One forward and backward of the batch; `sink(name, g)` receives, for every trainable Linear
    parameter, its per-example gradients g (rows x param shape). Returns (per-row losses, batch
    gradient by name). Uses torch.autograd.grad: the parameters' .grad are left untouched."""
    named = lora_parameters(model)
    modules = _linear_modules(model)
    keep = batch["attention_mask"].bool()  # padding positions contribute nothing, even if non-finite
    rows, width = keep.shape

    def hook(name: str, module: torch.nn.Linear):
        def forward_hook(_module, inputs, output):
            if not output.requires_grad:
                return
            a = inputs[0].detach()

            def on_grad(g):
                dtype = module.weight.dtype
                a3 = a.reshape(rows, -1, a.shape[-1]).to(dtype)
                g3 = g.detach().reshape(rows, -1, g.shape[-1]).to(dtype)
                if g3.shape[1] == width:  # exactly 0 at padding already, unless non-finite: make sure
                    g3 = torch.where(keep[..., None], g3, 0)
                if module.weight.requires_grad:
                    sink(f"{name}.weight", torch.einsum("nto,nti->noi", g3, a3))
                if module.bias is not None and module.bias.requires_grad:
                    sink(f"{name}.bias", g3.sum(1))

            output.register_hook(on_grad)
        return forward_hook

    handles = [m.register_forward_hook(hook(name, m)) for name, m in modules.items()]
    try:
        with torch.enable_grad():
            losses = _row_losses(model, batch, reduction)
            grads = torch.autograd.grad(losses.sum(), [p for _, p in named], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    batch_grad = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}
    return losses.detach(), batch_grad


@dataclass
class ExampleGrads:
    """Per-example gradients of the trainable (LoRA) parameters for one batch."""

    grads: Grads  # name -> (rows, *param shape); sums over rows to `batch_grad`
    batch_grad: Grads  # name -> the gradient of Σ_n ℓ_n (reduction "batch": what loss.backward() gives)
    losses: torch.Tensor  # (rows,) ℓ_n; Σ_n ℓ_n = the batch loss for reduction "batch"

    @property
    def loss(self) -> float:
        return float(self.losses.sum())

    def flat(self) -> torch.Tensor:
        """(rows, P): each example's gradient, parameters concatenated in model order."""
        return torch.cat([g.reshape(g.shape[0], -1) for g in self.grads.values()], dim=1)


def per_example_grads(model, batch: Batch, reduction: str = "batch") -> ExampleGrads:
    """Every example's gradient of its loss ℓ_n (see `_row_losses` for the two reductions) with
    respect to the trainable parameters, in the model's current mode (train: with LoRA dropout, as
    the update sees it), at the current parameters. Leaves .grad untouched."""
    per: Grads = {}

    def sink(name: str, g: torch.Tensor) -> None:
        per[name] = per[name] + g if name in per else g

    losses, batch_grad = _backward_per_example(model, batch, reduction, sink)
    names = list(batch_grad)
    rows = batch["input_ids"].shape[0]
    grads = {n: per[n] if n in per else batch_grad[n].new_zeros((rows, *batch_grad[n].shape)) for n in names}
    return ExampleGrads(grads, batch_grad, losses)


# --- credits -------------------------------------------------------------------------------------

def clip_coefficient(grad: Grads, max_norm: float) -> float:
    """The factor torch.nn.utils.clip_grad_norm_ scales a gradient by (1 when max_norm is 0: no clipping)."""
    if not max_norm:
        return 1.0
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grad.values()))
    return min(1.0, max_norm / (norm + 1e-6))


def adam_preconditioner(optimizer: torch.optim.Optimizer, named: Sequence[tuple[str, torch.nn.Parameter]],
                        grad: Grads) -> Grads:
    """The LESS-style alternative to the SGD direction: per parameter, 1/(sqrt(v̂_t) + ε) with v̂_t
    Adam's bias-corrected second moment after this step's gradient `grad` (the gradient the optimizer
    is about to see, clipped if the step clips), read from the optimizer's state before its step.
    Defined from the first step on (v̂_1 = g_1²). Pass it to `step_credits(preconditioner=...)`."""
    name_of = {id(p): n for n, p in named}
    out = {}
    for group in optimizer.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            if id(p) not in name_of:
                continue
            name = name_of[id(p)]
            state = optimizer.state.get(p, {})
            step = float(state["step"]) + 1 if "step" in state else 1.0
            g = grad[name].to(p.dtype)
            v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g if "exp_avg_sq" in state else (1 - beta2) * g * g
            out[name] = 1.0 / ((v / (1 - beta2 ** step)).sqrt() + eps)
    missing = set(name_of.values()) - set(out)
    if missing:
        raise ValueError(f"parameters not in the optimizer: {sorted(missing)[:3]}")
    return out


def _scaled(train: Grads, preconditioner: Grads | None) -> Grads:
    return train if preconditioner is None else {n: g * preconditioner[n] for n, g in train.items()}


def credits_from_grads(train: ExampleGrads, dev: ExampleGrads, lr: float,
                       preconditioner: Grads | None = None) -> np.ndarray:
    """(train rows x dev rows): lr · ⟨P ⊙ ∇ℓ(z_i), ∇ℓ(q)⟩ from materialised gradients (P = 1 unless a
    preconditioner is given). `step_credits` computes the same without holding the dev gradients."""
    scaled = _scaled(train.grads, preconditioner)
    out = sum(torch.einsum("ip,qp->iq", scaled[n].flatten(1), dev.grads[n].flatten(1)) for n in scaled)
    return (lr * out.double()).cpu().numpy()


@dataclass
class StepCredits:
    """One training step's credits and what the optimizer step needs."""

    credits: np.ndarray  # (batch rows, dev questions) float64: lr · ⟨P ⊙ ∇ℓ(z_i), ∇ℓ(q)⟩ at θ_t
    loss: float  # the training batch's loss (Hugging Face's mean over its label tokens)
    grad: Grads  # its gradient, what loss.backward() would accumulate: `write_grads` puts it in .grad
    dev_losses: np.ndarray  # (dev questions,) ℓ(q; θ_t), minus the per-question gold_loglik before the step


def step_credits(model, train_batch: Batch, dev_batch: Batch, lr: float, *,
                 preconditioner: Grads | None = None, dev_chunk: int = 0, dev_tokens: int = 0) -> StepCredits:
    """The credits of one training step, with the model at θ_t, before the update.

    train_batch: the step's micro-batch (LoraTrainer._batch), taken in the model's current mode
    (train, as the update sees it). dev_batch: one row per dev question (`training.pad_rows(dev_rows(...), pad id)`),
    taken in eval mode (as scoring sees it; the modes are restored after). lr: the step size η_t
    credited (the scheduler's current lr, times `clip_coefficient` when the step clips).
    preconditioner: None for the SGD direction (default), or `adam_preconditioner(...)`.
    dev_chunk, dev_tokens: dev questions and padded tokens per forward pass (0: any; `dev_chunks`).

    Two forward/backward passes (the batch, then the dev set in chunks), no .grad touched: the
    returned `grad` is the batch gradient, so the loop needs no backward of its own
    (`write_grads(model, step.grad)`, clip, `optimizer.step()`)."""
    train = per_example_grads(model, train_batch, "batch")
    dots, dev_losses = contract_dev(model, _scaled(train.grads, preconditioner), dev_batch, dev_chunk, dev_tokens)
    return StepCredits((lr * dots).cpu().numpy(), train.loss, train.batch_grad, dev_losses)


class _EvalMode:
    """The model in eval mode inside the block (as scoring sees the dev set), every module's mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes.items():
            m.train(mode)


def contract_dev(model, rows: Grads, dev_batch: Batch, dev_chunk: int = 0, dev_tokens: int = 0
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """(dots, dev losses): dots[i, q] = ⟨rows_i, ∇ℓ(q)⟩ (float64, rows x dev questions), with `rows`
    per-row gradients by parameter name (rows x param shape), and ℓ(q) per question, both at the current
    parameters in eval mode. One forward/backward of the dev set in chunks of `dev_chunk` questions and
    `dev_tokens` padded tokens (0: any; `dev_chunks`); each dev gradient is contracted as it arrives,
    layer by layer, never all held."""
    n = dev_batch["input_ids"].shape[0]
    first = next(iter(rows.values()))
    dots = torch.zeros((first.shape[0], n), dtype=torch.float64, device=first.device)
    dev_losses = []
    with _EvalMode(model):
        for start, stop in dev_chunks(dev_batch, dev_chunk, dev_tokens):

            def sink(name: str, g: torch.Tensor, start=start, stop=stop) -> None:
                dots[:, start:stop] += torch.einsum("ip,qp->iq", rows[name].flatten(1), g.flatten(1)).double()

            losses, _ = _backward_per_example(model, _rows(dev_batch, start, stop), "example", sink)
            dev_losses.append(losses.double())
    return dots, torch.cat(dev_losses).cpu().numpy()


def dev_gradients(model, dev_batch: Batch, dev_chunk: int = 0, dev_tokens: int = 0) -> tuple[Grads, np.ndarray]:
    """(gradients, losses): every dev question's gradient of ℓ(q) by parameter name (questions x param
    shape), held in full, and ℓ(q) per question; in eval mode, in chunks of `dev_chunk` questions and
    `dev_tokens` padded tokens (0: any; `dev_chunks`), each chunk's gradients copied into place as it is
    taken (never a second copy of all of them)."""
    n = dev_batch["input_ids"].shape[0]
    held: Grads = {}
    losses = []
    with _EvalMode(model):
        for start, stop in dev_chunks(dev_batch, dev_chunk, dev_tokens):
            got = per_example_grads(model, _rows(dev_batch, start, stop), "example")
            for name, g in got.grads.items():
                if stop - start == n:  # one chunk: its own tensors
                    held[name] = g
                    continue
                if name not in held:
                    held[name] = g.new_empty((n, *g.shape[1:]))
                held[name][start:stop] = g
            losses.append(got.losses.double())
            del got
    return held, torch.cat(losses).cpu().numpy()


def held_dots(rows: Grads, held: Grads) -> torch.Tensor:
    """(rows x dev questions) float64: ⟨rows_i, held_q⟩ summed parameter by parameter, as `contract_dev`
    sums them, from dev gradients held by `dev_gradients`."""
    out = None
    for name, g in rows.items():
        part = torch.einsum("ip,qp->iq", g.flatten(1), held[name].flatten(1)).double()
        out = part if out is None else out + part
    return out


def write_grads(model, grad: Grads) -> None:
    """Set each trainable parameter's .grad to `grad` (replacing what was there), as loss.backward()
    on a zeroed model would: the one place this module touches .grad."""
    for name, p in lora_parameters(model):
        p.grad = grad[name].detach().clone()


# --- accumulating over steps and runs ------------------------------------------------------------

class InRunCredits:
    """Credits per (run, player, dev question), summed over each run's steps, in float64.

    `add` after every step; `vector_result` / `result` read them as a `ShapleyResult` (one credit per
    run, the value their mean, stderr over runs); `state` / `from_state` carry them exactly through a
    checkpoint (plain arrays + JSON-able metadata)."""

    VERSION = 1

    def __init__(self, players: Sequence[Player], n_dev: int, runs: int):
        if runs < 1 or n_dev < 1:
            raise ValueError("runs and n_dev must be at least 1")
        self.players = list(players)
        self.index = {p: i for i, p in enumerate(self.players)}
        if len(self.index) != len(self.players):
            raise ValueError("players must be distinct")
        self.totals = np.zeros((runs, len(self.players), n_dev))
        self.steps = np.zeros(runs, dtype=np.int64)  # steps credited per run

    @property
    def runs(self) -> int:
        return self.totals.shape[0]

    @property
    def n_dev(self) -> int:
        return self.totals.shape[2]

    def add(self, run: int, batch_players: Sequence[Player], credits) -> None:
        """Add one step's credits (batch rows x dev questions, e.g. `StepCredits.credits`) of run `run`;
        row r belongs to batch_players[r] (a player twice in a batch gets both rows)."""
        credits = credits.detach().double().cpu().numpy() if isinstance(credits, torch.Tensor) else credits
        credits = np.asarray(credits, dtype=np.float64)
        if credits.shape != (len(batch_players), self.n_dev):
            raise ValueError(f"credits of shape {credits.shape}, expected {(len(batch_players), self.n_dev)}")
        np.add.at(self.totals[run], [self.index[p] for p in batch_players], credits)
        self.steps[run] += 1

    def vector_result(self, runs: int | None = None) -> ShapleyResult:
        """One credit vector (per dev question) per run and player, over the first `runs` runs (all by
        default): a vector-game result for `shed.shapley.local_values` (dev_neighbours games).
        estimates: running values after each run; evaluations_made: steps credited after each run;
        evaluations: none (nothing is retrained)."""
        return self._result(self.totals[: runs or self.runs], self.steps[: runs or self.runs])

    def result(self, weights: np.ndarray, runs: int | None = None) -> ShapleyResult:
        """The scalar game whose dev value weighs question q by weights[q] (`token_weights` for the
        whole dev set as gold_loglik scores it; uniform 1/Q for a plain mean)."""
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (self.n_dev,):
            raise ValueError(f"weights of shape {weights.shape}, expected {(self.n_dev,)}")
        return self._result(self.totals[: runs or self.runs] @ weights, self.steps[: runs or self.runs])

    def _result(self, totals: np.ndarray, steps: np.ndarray) -> ShapleyResult:
        credits = {p: [_value(totals[r, i]) for r in range(len(totals))] for i, p in enumerate(self.players)}
        values = {p: _value(np.mean(c, axis=0)) for p, c in credits.items()}
        stderr = {p: _stderr_of(c) for p, c in credits.items()}
        estimates = [{p: _value(np.mean(totals[: r + 1, i], axis=0)) for i, p in enumerate(self.players)}
                     for r in range(len(totals))]
        return ShapleyResult(values, stderr, credits, {}, estimates, [int(s) for s in np.cumsum(steps)])

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, metadata): numpy arrays (safetensors-friendly) and JSON-able metadata; `from_state`
        rebuilds an identical accumulator. Players must be ints or strings."""
        players = []
        for p in self.players:
            if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer, str)):
                raise TypeError(f"player {p!r}: only int and str players can be saved")
            players.append(int(p) if isinstance(p, (int, np.integer)) else p)
        arrays = {"totals": np.ascontiguousarray(self.totals), "steps": np.ascontiguousarray(self.steps)}
        return ({k: v.copy() for k, v in arrays.items()},
                {"version": self.VERSION, "players": players, "n_dev": self.n_dev, "runs": self.runs})

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> InRunCredits:
        if meta.get("version") != cls.VERSION:
            raise ValueError(f"in-run credits state version {meta.get('version')!r}, expected {cls.VERSION}")
        out = cls(meta["players"], meta["n_dev"], meta["runs"])
        totals, steps = np.asarray(arrays["totals"]), np.asarray(arrays["steps"])
        if totals.shape != out.totals.shape or steps.shape != out.steps.shape:
            raise ValueError(f"in-run credits state: arrays of shape {totals.shape}, {steps.shape} do not match "
                             f"{out.totals.shape}, {out.steps.shape}")
        out.totals[...] = totals
        out.steps[...] = steps
        return out

    def clear_run(self, run: int) -> None:
        """Forget run `run`'s credits (before it is run again from its start)."""
        self.totals[run] = 0.0
        self.steps[run] = 0

    def run_slice(self, run: int) -> InRunCredits:
        """Run `run` alone, as a one-run accumulator (what a per-run checkpoint saves)."""
        out = InRunCredits(self.players, self.n_dev, 1)
        out.totals[0] = self.totals[run]
        out.steps[0] = self.steps[run]
        return out

    def put_run(self, run: int, one: InRunCredits) -> None:
        """Set run `run` from a one-run accumulator of the same players and dev questions (`run_slice`'s inverse)."""
        if one.players != self.players or one.n_dev != self.n_dev or one.runs != 1:
            raise ValueError("put_run: a one-run accumulator of the same players and dev questions is needed")
        self.totals[run] = one.totals[0]
        self.steps[run] = one.steps[0]


# --- the in-run valuation driver: one LoRA fit per run, credited step by step (no file I/O) -------

@torch.no_grad()
def dev_losses(model, dev_batch: Batch, dev_chunk: int = 0, dev_tokens: int = 0) -> np.ndarray:
    """ℓ(q; θ) per dev question at the model's current parameters, in eval mode (minus the
    per-question gold_loglik), float64, in the chunks of `dev_chunks`; the modes are restored after."""
    with _EvalMode(model):
        out = [_row_losses(model, _rows(dev_batch, start, stop), "example").double()
               for start, stop in dev_chunks(dev_batch, dev_chunk, dev_tokens)]
    return torch.cat(out).cpu().numpy()


@dataclass
class RunSummary:
    """One in-run valuation run: its seed, steps and what the dev loss did."""

    run: int
    seed: int
    steps: int
    train_loss: float  # the trainer's mean step loss over the last epoch
    seconds: float  # the whole fit, credits included
    credit_seconds: float  # of which computing credits
    dev_before: np.ndarray  # ℓ(q; θ_0) per dev question
    dev_after: np.ndarray  # ℓ(q; θ_T) per dev question, after the last step
    first_order: np.ndarray  # Σ_steps Σ_examples credits per dev question: the first-order prediction of
    #                          dev_before - dev_after (the drop of each question's loss over the run)
    resumed_from: int = 0  # the step the fit resumed at from a mid-run checkpoint (0: from the start)
    losses: list[float] = field(default_factory=list)  # the trainer's loss at each step (the run's curve)


class CreditCallback:
    """`LoraTrainer.fit`'s callback for run `run`: before each update, each example's credit per dev
    question at θ_t, added to `credits` under its player; it returns the step's loss and gradient, so
    the trainer takes no second pass over the batch.

    The credit of example i at step t is `η_t · c_t · ⟨∇ℓ_i, ∇ℓ(q)⟩` (SGD direction): η_t the
    scheduler's learning rate of the step, c_t the step's gradient-clipping coefficient (computed from
    the step's full gradient, the token-weighted sum of its micro-batches' gradients), ℓ_i example i's
    share of the step's loss. With gradient accumulation the step's loss is the mean over all its
    micro-batches' label tokens, so a micro-batch's per-example gradients (normalised over its own
    tokens) are weighted by its share of the step's label tokens; with one micro-batch (the default)
    the weight is 1. A step's credits add up to the first-order change of each question's loss along
    the clipped SGD step `-η_t c_t ∇L_batch`.

    `adam=(beta2, eps)` credits along Adam's direction instead (LESS-style, `adam_preconditioner`):
    each example's gradient divided elementwise by the optimizer's bias-corrected second moment at
    this step, `1/(sqrt(v̂_t)+ε)`, momentum left out. The callback sees no optimizer, so it keeps its
    own copy of v from the steps' clipped full gradients (what Adam accumulates). A step's credits
    then add up to the first-order change along `-η_t P_t ⊙ c_t ∇L_batch`, the update of an Adam with
    β1 = 0 (at the first step, Adam's own).

    `dev_every` N: the dev questions' gradients are taken at every step (N = 1, streamed, never all
    held) or held and refreshed at steps 0, N, 2N, ... (`dev_gradients`, n_dev x LoRA parameters), in the
    chunks of `dev_chunks` (`dev_chunk` items, `dev_tokens` padded tokens).

    `step_players[t][m]` lists the players of step t's micro-batch m row by row (from the trainer's
    own `schedule`); `step_rows[t][m]`, if given, their token ids, checked against the batches the
    trainer passes, so that a credit can never land on the wrong player.

    `state()` / `load_state(state)` carry it through a mid-run checkpoint (`LoraTrainer.fit`): this
    run's credits so far, the first-order sums, the dev losses before the run, the Adam copy, and the
    held dev gradients when the next step reuses them.

    `curve`, if given, is another fit callback that only watches (`curves.StepCurve`): it sees each step's
    `after_step` and, on a resumed fit, the restored steps' losses (`resumed`)."""

    def __init__(self, model, dev_batch: Batch, credits: InRunCredits, run: int,
                 step_players: list[list[list[Player]]], max_grad_norm: float, *,
                 step_rows: list[list[list[list[int]]]] | None = None, dev_chunk: int = 0, dev_tokens: int = 0,
                 adam: tuple[float, float] | None = None, dev_every: int = 1, normalize: str = "none",
                 peak_lr: float = 1.0, curve=None):
        if dev_every < 1:
            raise ValueError(f"dev_every must be at least 1, not {dev_every}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {normalize!r}")
        self.normalize, self.peak_lr, self.curve = normalize, peak_lr, curve
        self.model, self.dev_batch, self.credits, self.run = model, dev_batch, credits, run
        self.step_players, self.step_rows = step_players, step_rows
        self.max_grad_norm, self.dev_chunk, self.dev_tokens = max_grad_norm, dev_chunk, dev_tokens
        self.adam, self.dev_every = adam, dev_every
        self.exp_avg_sq: Grads = {}
        self.adam_steps = 0
        self.held: Grads | None = None  # dev gradients from step held_step (dev_every > 1)
        self.held_step = -1
        self.seconds = 0.0
        self.dev_before: np.ndarray | None = None
        self.first_order = np.zeros(credits.n_dev)
        self.expected_loss: float | None = None
        self.loss_mismatch: tuple[int, float, float] | None = None  # the first step whose loss disagreed

    def _check(self, step: int, batches: list[Batch]) -> None:
        players = self.step_players[step]
        if len(batches) != len(players) or any(b["input_ids"].shape[0] != len(p) for b, p in zip(batches, players)):
            got = [b["input_ids"].shape[0] for b in batches]
            raise RuntimeError(f"in-run credits: step {step}'s batches do not match the trainer's schedule "
                               f"({got} rows, expected {[len(p) for p in players]})")
        if self.step_rows is None:
            return
        for m, (batch, rows) in enumerate(zip(batches, self.step_rows[step])):
            ids = batch["input_ids"].cpu()
            for j, row in enumerate(rows):
                if ids.shape[1] < len(row) or not torch.equal(ids[j, : len(row)], torch.tensor(row, dtype=ids.dtype)):
                    raise RuntimeError(f"in-run credits: step {step}, micro-batch {m}, row {j} is not the record "
                                       "the trainer's schedule puts there")

    def _adam_preconditioner(self, grad: Grads, coefficient: float) -> Grads:
        """1/(sqrt(v̂_t)+ε) with v_t = β2 v_{t-1} + (1-β2) g_t², g_t the step's clipped full gradient."""
        beta2, eps = self.adam
        self.adam_steps += 1
        out = {}
        for name, g in grad.items():
            g = g * coefficient
            v = self.exp_avg_sq.get(name)
            self.exp_avg_sq[name] = v = (1 - beta2) * g * g if v is None else beta2 * v + (1 - beta2) * g * g
            out[name] = 1.0 / ((v / (1 - beta2 ** self.adam_steps)).sqrt() + eps)
        return out

    def before_step(self, step: int, batches: list[Batch], lr: float) -> tuple[float, Grads] | None:
        start = time.perf_counter()
        self._check(step, batches)
        tokens = [int(response_tokens(b).sum()) for b in batches]
        total = max(sum(tokens), 1)
        shares = [n / total for n in tokens]
        trains = [per_example_grads(self.model, batch, "batch") for batch in batches]
        grad, loss = {}, 0.0
        for train, share in zip(trains, shares):
            for name, g in train.batch_grad.items():
                grad[name] = grad[name] + share * g if name in grad else share * g
            loss += share * train.loss
        coefficient = clip_coefficient(grad, self.max_grad_norm)
        # The Adam preconditioner needs the whole step's gradient, so every micro-batch's per-example
        # gradients are taken first and the dev set is contracted once per step, not once per micro-batch.
        preconditioner = self._adam_preconditioner(grad, coefficient) if self.adam else None
        rows = _scaled({name: torch.cat([share * t.grads[name] for t, share in zip(trains, shares)])
                        for name in grad}, preconditioner)
        dev_losses = None
        if self.dev_every == 1 and self.normalize != "cosine":
            dots, dev_losses = contract_dev(self.model, rows, self.dev_batch, self.dev_chunk, self.dev_tokens)
        else:
            if step % self.dev_every == 0:
                self.held = None  # the refresh replaces them: not two sets held at once
                self.held, dev_losses = dev_gradients(self.model, self.dev_batch, self.dev_chunk, self.dev_tokens)
                self.held_step = step
            elif self.held is None:
                raise RuntimeError(f"in-run credits: step {step} reuses dev gradients that were never taken "
                                   "(a resumed state without them)")
            dots = held_dots(rows, self.held)
        if self.dev_before is None and dev_losses is not None:
            self.dev_before = dev_losses
        players = [p for who in self.step_players[step] for p in who]
        if self.normalize == "none":
            step_credits_ = dots.cpu().numpy() * (lr * coefficient)
        else:
            step_credits_ = self._normalized(dots, rows, batches, total) * (lr / self.peak_lr)
        self.credits.add(self.run, players, step_credits_)
        self.first_order += step_credits_.sum(0)
        self.expected_loss = loss
        self.seconds += time.perf_counter() - start
        # A step without label tokens is left to the trainer, which treats it its own way.
        return (loss, grad) if sum(tokens) else None

    def _normalized(self, dots: torch.Tensor, rows: Grads, batches: list[Batch], total: int) -> np.ndarray:
        """dots[i, q] = ⟨rows_i, g_q⟩ with rows_i = (tokens_i / the step's tokens) ∇ℓ̄_i (ℓ̄_i: example i's mean
        per-token loss): "tokens" gives ⟨∇ℓ̄_i, g_q⟩, "cosine" ⟨∇ℓ̄_i, g_q⟩ / (‖∇ℓ̄_i‖ ‖g_q‖): no factor of a
        record's length, of its micro-batch's or step's size, nor of the step's clipping."""
        share = np.concatenate([response_tokens(b) for b in batches]).astype(np.float64) / total
        out = dots.cpu().numpy() / np.where(share > 0, share, np.inf)[:, None]
        if self.normalize == "cosine":
            row_norm = torch.sqrt(sum(g.flatten(1).double().pow(2).sum(1) for g in rows.values())).cpu().numpy()
            dev_norm = torch.sqrt(sum(g.flatten(1).double().pow(2).sum(1) for g in self.held.values())).cpu().numpy()
            out = out * np.where(row_norm > 0, share / np.where(row_norm > 0, row_norm, 1), 0)[:, None]
            out = out / np.where(dev_norm > 0, dev_norm, np.inf)[None, :]
        return out

    def after_step(self, step: int, loss: float, lr: float) -> None:
        # The trainer's step loss must be the one the credits were normalised to: a mismatch (another
        # micro-batch normalisation) would mis-scale every credit. Dropout and half precision make the
        # two forwards differ slightly, hence the tolerance; the first mismatch is kept for the caller.
        if self.expected_loss is not None and self.loss_mismatch is None \
                and abs(loss - self.expected_loss) > 1e-2 * max(1.0, abs(self.expected_loss)):
            self.loss_mismatch = (step, loss, self.expected_loss)
        self.expected_loss = None
        if self.curve is not None:
            self.curve.after_step(step, loss, lr)

    def resumed(self, losses: list[float]) -> None:
        if self.curve is not None:
            self.curve.resumed(losses)

    def state(self) -> dict:
        """{"tensors": name -> tensor, "meta": JSON-able}, between two steps (see the class docstring)."""
        steps = int(self.credits.steps[self.run])  # steps credited so far: the next step's index
        tensors = {"totals": torch.from_numpy(self.credits.totals[self.run].copy()),
                   "first_order": torch.from_numpy(self.first_order.copy())}
        if self.dev_before is not None:
            tensors["dev_before"] = torch.from_numpy(self.dev_before.copy())
        tensors.update({f"exp_avg_sq/{n}": v.detach().clone() for n, v in self.exp_avg_sq.items()})
        # Held dev gradients only when the next step reuses them: a refresh step takes them anew anyway.
        if self.held is not None and steps % self.dev_every:
            tensors.update({f"dev_grads/{n}": g for n, g in self.held.items()})
        meta = {"run": self.run, "steps": steps, "players": len(self.credits.players), "n_dev": self.credits.n_dev,
                "dev_every": self.dev_every, "held_step": self.held_step, "adam_steps": self.adam_steps,
                "seconds": self.seconds, "loss_mismatch": list(self.loss_mismatch) if self.loss_mismatch else None}
        return {"tensors": tensors, "meta": meta}

    def load_state(self, state: dict) -> None:
        """Continue from `state()`'s state: this run's credits so far go back into `credits`."""
        tensors, meta = state["tensors"], state["meta"]
        if (meta["run"], meta["players"], meta["n_dev"], meta["dev_every"]) != \
                (self.run, len(self.credits.players), self.credits.n_dev, self.dev_every):
            raise ValueError("in-run credits: the checkpoint is of another run, players, dev set or dev_every")
        device = lora_parameters(self.model)[0][1].device
        self.credits.totals[self.run] = tensors["totals"].numpy()
        self.credits.steps[self.run] = meta["steps"]
        self.first_order = tensors["first_order"].numpy().copy()
        self.dev_before = tensors["dev_before"].numpy().copy() if "dev_before" in tensors else None
        self.exp_avg_sq = {k.split("/", 1)[1]: v.to(device) for k, v in tensors.items() if k.startswith("exp_avg_sq/")}
        held = {k.split("/", 1)[1]: v.to(device) for k, v in tensors.items() if k.startswith("dev_grads/")}
        self.held, self.held_step = held or None, meta["held_step"]
        self.adam_steps, self.seconds = meta["adam_steps"], meta["seconds"]
        self.loss_mismatch = tuple(meta["loss_mismatch"]) if meta["loss_mismatch"] else None
        self.expected_loss = None


def run_seed(train_seed: int, run: int) -> int:
    """Run r's seed: the recipe's seed plus r. It seeds both the adapter init and the data order
    (`LoraTrainer.fit`), so runs differ in both; run 0 is the recipe's own fit on all proxies."""
    return train_seed + run


DIRECTIONS = ("sgd", "adam")
# How a step's credit is scaled: none (η_t c_t ⟨∇ℓ_i, ∇ℓ_q⟩, In-Run Data Shapley's first-order term), tokens
# (η_t/η ⟨∇ℓ̄_i, ∇ℓ_q⟩ with ℓ̄_i the per-token mean loss), cosine (η_t/η cos(∇ℓ̄_i, ∇ℓ_q), LESS).
NORMALIZATIONS = ("none", "tokens", "cosine")


def adam_settings(trainer) -> tuple[float, float]:
    """(beta2, eps) of the trainer's optimizer (`trainer.optimizer`), which must be Adam or AdamW."""
    optimizer, _ = trainer.optimizer(1)
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"direction adam: the trainer's optimizer is {type(optimizer).__name__}, not Adam(W)")
    group = optimizer.param_groups[0]
    return float(group["betas"][1]), float(group["eps"])


def warmup_records(records: list[dict], share: float, seed: int) -> list[dict]:
    """The warm-up fit's records: a seeded sample of `share` of `records` (at least one), in their order."""
    if not share:
        return []
    count = min(len(records), max(1, round(share * len(records))))
    picked = np.random.default_rng(seed).choice(len(records), size=count, replace=False)
    return [records[i] for i in sorted(picked.tolist())]


def value_runs(trainer, records: list[dict], players: Sequence[Player], dev_batch: Batch, credits: InRunCredits,
               runs: Sequence[int], *, direction: str = "sgd", dev_chunk: int = 0, dev_tokens: int = 0,
               dev_every: int = 1, normalize: str = "none", warmup: float = 0.0, progress=None,
               on_run: Callable[[RunSummary], None] | None = None,
               checkpoints: Callable[[int], object] | None = None,
               curves: Callable[[int], object] | None = None) -> list[RunSummary]:
    """In-run valuation: for each run r in `runs`, one `trainer.fit` on all `records` (the proxies;
    records[i] is players[i]'s) with seed `run_seed(trainer.cfg.seed, r)`, credited step by step into
    `credits` run r (cleared first). direction: "sgd" (the plain gradient, default) or "adam" (Adam's
    preconditioned one); dev_chunk, dev_tokens: dev items and padded tokens per dev pass (`dev_chunks`);
    dev_every: steps between refreshes of the dev gradients; normalize: none, tokens or cosine
    (`NORMALIZATIONS`); see `CreditCallback`. warmup: share of `records` (`warmup_records`, seeded by the run) the
    adapter is first fit on, uncredited; the credited fit then trains on from that adapter, and its dev losses
    before (`RunSummary.dev_before`) are the warmed-up model's.
    `checkpoints(r)`, if given, is run r's mid-run checkpoint (`training.Checkpoint`): a run it holds a
    state of resumes there. `on_run(summary)` is called after each completed run (the stage saves the
    run there). `curves(r)`, if given, is run r's watching fit callback (`CreditCallback`'s curve): the stage
    logs the run's loss curve there as each step happens. `progress`: a tqdm-like bar, updated once per step.
    No file I/O."""
    if len(records) != len(players):
        raise ValueError("records and players must pair up")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    adam = adam_settings(trainer) if direction == "adam" else None
    out = []
    for run in runs:
        seed = run_seed(trainer.cfg.seed, run)
        schedule = trainer.schedule(records, seed)
        step_players = [[[players[i] for i in micro] for micro in step] for step in schedule]
        step_rows = [[[trainer.encode(records[i])[0] for i in micro] for micro in step] for step in schedule]
        credits.clear_run(run)
        callback = CreditCallback(trainer.model, dev_batch, credits, run, step_players, trainer.cfg.max_grad_norm,
                                  step_rows=step_rows, dev_chunk=dev_chunk, dev_tokens=dev_tokens, adam=adam,
                                  dev_every=dev_every,
                                  normalize=normalize, peak_lr=trainer.cfg.lr,
                                  curve=curves(run) if curves is not None else None)
        if progress is not None and hasattr(progress, "set_postfix"):
            progress.set_postfix(run=run)
        warm = warmup_records(records, warmup, seed)
        if warm:
            # Redone on a resumed run too (it is short and seeded): the checkpoint then restores the adapter.
            steps = trainer.fit(warm, seed=seed)["steps"]
            log.info("in-run run %d: warm-up fit on %d records (%d steps), not credited", run, len(warm), steps)
        fit = trainer.fit(records, seed=seed, progress=progress, callback=callback,
                          checkpoint=checkpoints(run) if checkpoints is not None else None, reset=not warm)
        if fit["resumed_from"]:
            log.info("in-run run %d resumed from its mid-run checkpoint at step %d of %d", run, fit["resumed_from"],
                     fit["steps"])
        if callback.loss_mismatch is not None:
            step, got, expected = callback.loss_mismatch
            log.warning("in-run credits, run %d: the trainer's step %d loss %.6g is not the credited batches' "
                        "token-weighted loss %.6g (LoRA dropout draws differ; otherwise the trainer normalises "
                        "its micro-batches differently and the credits are mis-scaled)", run, step, got, expected)
        if int(credits.steps[run]) != fit["steps"]:
            raise RuntimeError(f"in-run credits: {int(credits.steps[run])} steps credited, the fit took {fit['steps']}")
        summary = RunSummary(run, seed, fit["steps"], fit["loss"], fit["seconds"], callback.seconds,
                             callback.dev_before, dev_losses(trainer.model, dev_batch, dev_chunk, dev_tokens),
                             callback.first_order, fit["resumed_from"], fit["losses"])
        out.append(summary)
        if on_run is not None:
            on_run(summary)
    return out
