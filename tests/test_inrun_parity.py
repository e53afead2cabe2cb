"""shed.inrun against dattri-llm (PyPI 0.1.0, in the test extra), an independent implementation of
per-example gradients from layer hooks, on a tiny float64 Llama with LoRA and one training step.

dattri-llm's `HookManager` (default config: every trainable linear, here the LoRA A and B matrices)
hooks the same layers as shed and gets the same per-example gradients. `CreditCallback`'s credits,
in one batch or in micro-batches, with the dev gradients streamed or held, are its TracIn dots
(`ops.layerwise_cross_dot`) times the step's lr and clip coefficient (normalize none), its dots of
per-token-mean gradients times lr/peak lr (tokens), or its GradCos times lr/peak lr (cosine).
The Adam direction is not compared: dattri-llm's optimizer-aware capture is LESS's per-example update
(each example's own g² in Adam's second moment, momentum kept), another quantity; test_inrun.py checks
shed's against AdamW's step. docs/engine.md ("Libraries") says why shed keeps its own hooks."""

import numpy as np
import pytest
import torch
from dattri_llm import Gradient, HookManager, HookManagerConfig
from dattri_llm.gradient import ops
from helpers import move_lora_b_off_zero, tiny_float64_trainer

from shed import inrun
from shed.config import LoraConfig, TrainConfig
from shed.training import pad_rows

RECORDS = [
    {"id": f"p{i}", "instruction": instruction, "input": "", "output": output}
    for i, (instruction, output) in enumerate([
        ("Name a colour.", "red"), ("Name two animals.", "a dog and a cat"),
        ("Count to three.", "one two three"), ("Name a fruit you can eat.", "plum")])
]
QUESTIONS = [
    {"question": "Name a colour.", "choices": ["red", "dog"], "answer": 0},
    {"question": "Name an animal.", "choices": ["plum", "cat"], "answer": 1},
    {"question": "Count to two.", "choices": ["one two", "red"], "answer": 0},
]
TRAIN = TrainConfig(template="qa", batch_size=4, max_length=64,
                    lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
LR, PEAK_LR, MAX_GRAD_NORM = 0.02, 0.05, 0.5
# Tolerances (relative to the largest entry). Both sides backpropagate the same loss: float64 summation order
# only. The reference's loss is scaled otherwise (per record rather than per micro-batch): Llama's RMSNorm
# runs in float32 even in a float64 model, its backward too, where another scale rounds otherwise (~1e-7).
RTOL, RTOL_RESCALED = 1e-9, 1e-6

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
    # dattri-llm's full backward hooks on the first layer's LoRA A, whose input (the frozen base's) needs no grad.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]


@pytest.fixture(scope="module")
def trainer():
    t = tiny_float64_trainer(RECORDS, QUESTIONS, TRAIN)
    t.reset(0)
    move_lora_b_off_zero(t.model, seed=3)
    t.model.eval()  # no LoRA dropout: both implementations see the same forward
    return t


@pytest.fixture(scope="module")
def rows(trainer):
    return [trainer.encode(r) for r in RECORDS]


@pytest.fixture(scope="module")
def dev(trainer):
    return pad_rows(inrun.dev_rows(trainer.tokenizer, QUESTIONS), trainer.tokenizer.pad_token_id)


def label_tokens(batch) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum(1)


def captured(model, batch, divisor) -> tuple[Gradient, list[torch.Tensor]]:
    """(dattri-llm's per-example gradients, the batch gradient) of the loss Σ_n nll_n / divisor, nll_n row n's
    summed next-token NLL (written here, not shed's): the batch's label tokens as divisor give Hugging Face's
    loss and shed's "batch" reduction, each row's own (a tensor) its "example" one. Leaves .grad cleared."""
    manager = HookManager(model, config=HookManagerConfig())
    with manager.collect(deregister_on_exit=True):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        (nll.sum(1) / divisor).sum().backward()
    params = [p for _, p in inrun.lora_parameters(model)]
    grad = [p.grad for p in params]
    for p in params:
        p.grad = None
    return manager.get_gradient(), grad


def torch_clip_coefficient(model, grad: list[torch.Tensor]) -> float:
    """The factor torch.nn.utils.clip_grad_norm_ scales the step's gradient `grad` by (set as .grad, cleared after)."""
    params = [p for _, p in inrun.lora_parameters(model)]
    for p, g in zip(params, grad):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    clipped = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return float(clipped.norm() / torch.cat([g.flatten() for g in grad]).norm())


@pytest.fixture(scope="module")
def dev_gradient(trainer, dev):
    return captured(trainer.model, dev, label_tokens(dev))[0]


@pytest.mark.parametrize("reduction", ["batch", "example"])
def test_dattri_llm_hooks_the_same_layers_and_gets_the_same_per_example_gradients(trainer, rows, reduction):
    model, batch = trainer.model, trainer._batch(rows)
    ours = inrun.per_example_grads(model, batch, reduction)
    tokens = label_tokens(batch)
    theirs, _ = captured(model, batch, tokens.sum() if reduction == "batch" else tokens)
    assert {f"{name}.weight" for name in theirs.data} == set(ours.grads)  # every LoRA A and B, nothing more
    for name, factors in theirs.data.items():
        dense, mine = ops.materialize(factors, theirs.layer_types[name]), ours.grads[f"{name}.weight"].flatten(1)
        assert mine.abs().max() > 0 and torch.allclose(dense, mine, rtol=RTOL, atol=1e-12 * float(mine.abs().max()))


def step_batches(trainer, rows, split: list[int]) -> list[dict]:
    """The rows cut into micro-batches of `split` rows each, padded as the trainer pads them."""
    return [trainer._batch(rows[sum(split[:m]): sum(split[: m + 1])]) for m in range(len(split))]


def credited(model, micro_batches, dev, normalize: str, dev_every: int) -> np.ndarray:
    """(records x questions): shed's credits for one step of `micro_batches`, the records numbered in order."""
    sizes = [b["input_ids"].shape[0] for b in micro_batches]
    players = [list(range(sum(sizes[:m]), sum(sizes[: m + 1]))) for m in range(len(sizes))]
    credits = inrun.InRunCredits(list(range(sum(sizes))), len(QUESTIONS), runs=1)
    callback = inrun.CreditCallback(model, dev, credits, 0, [players], MAX_GRAD_NORM, dev_every=dev_every,
                                    normalize=normalize, peak_lr=PEAK_LR)
    callback.before_step(0, micro_batches, LR)
    return credits.totals[0]


def close(ours: np.ndarray, theirs: torch.Tensor, rtol: float) -> bool:
    theirs = theirs.numpy()
    scale = np.abs(theirs).max()
    return scale > 1e-3 and np.abs(ours - theirs).max() <= rtol * scale


SPLITS = [[4], [1, 3]]  # one batch, or two micro-batches of unequal label tokens (gradient accumulation)


@pytest.mark.parametrize(("split", "dev_every"), [(SPLITS[0], 1), (SPLITS[0], 2), (SPLITS[1], 1)])
def test_raw_credits_are_tracin_dots_times_the_steps_lr_and_clip_coefficient(trainer, rows, dev, dev_gradient,
                                                                              split, dev_every):
    model = trainer.model
    micro_batches = step_batches(trainer, rows, split)
    ours = credited(model, micro_batches, dev, "none", dev_every)
    # Each micro-batch's loss is Hugging Face's (its mean over its label tokens), weighted by its share of
    # the step's label tokens: so are its records' gradients, and the step's gradient is the weighted sum.
    step_tokens = sum(int(label_tokens(b).sum()) for b in micro_batches)
    dots, step_grad = [], None
    for batch in micro_batches:
        tokens = label_tokens(batch).sum()
        gradient, grad = captured(model, batch, tokens)
        share = int(tokens) / step_tokens
        dots.append(share * ops.layerwise_cross_dot(gradient, dev_gradient))
        step_grad = [share * g if step_grad is None else s + share * g for s, g in zip(step_grad or grad, grad)]
    coefficient = torch_clip_coefficient(model, step_grad)
    assert 0 < coefficient < 1  # the step clips
    assert close(ours / (LR * coefficient), torch.cat(dots), RTOL)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("normalize", ["tokens", "cosine"])
def test_normalised_credits_are_dots_and_gradcos_of_per_token_mean_gradients(trainer, rows, dev, dev_gradient,
                                                                              split, normalize):
    """tokens: ⟨∇ℓ̄_i, ∇ℓ_q⟩ with ℓ̄_i record i's mean per-token loss, cosine: their cosine (dattri-llm's GradCos,
    without its 1e-8 floor), both times lr/peak lr and independent of the step's micro-batches and clipping."""
    model = trainer.model
    ours = credited(model, step_batches(trainer, rows, split), dev, normalize, dev_every=1)
    whole = trainer._batch(rows)
    mean_losses, _ = captured(model, whole, label_tokens(whole))
    if normalize == "tokens":
        theirs = ops.layerwise_cross_dot(mean_losses, dev_gradient)
    else:
        theirs = mean_losses.similarity(dev_gradient, metric="cosine", reduce="all", eps=0.0)
    assert close(ours * PEAK_LR / LR, theirs, RTOL_RESCALED)
