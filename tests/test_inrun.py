"""shed.inrun on a tiny float64 Llama with LoRA: per-example gradients and their products are exact,
a step's credits add up to its first-order term, padding counts for nothing, and the run accumulator
averages, errs and round-trips as specified."""

import math

import numpy as np
import pytest
import torch
from helpers import move_lora_b_off_zero, tiny_float64_trainer

from shed import inrun, tiny
from shed.config import BaseConfig, LoraConfig, TrainConfig
from shed.scoring import gold_loglik
from shed.shapley import local_values
from shed.training import LoraTrainer, pad_rows

RECORDS = [
    {"id": f"r{i}", "instruction": f"Name a {kind}.", "input": "" if i % 2 else "quickly", "output": answer}
    for i, (kind, answer) in enumerate([("colour", "red"), ("animal", "dog"), ("number", "three"),
                                        ("fruit", "plum"), ("colour", "blue")])
]
QUESTIONS = [
    {"question": "Name a colour.", "choices": ["red", "dog", "three"], "answer": 0},
    {"question": "Name an animal.", "choices": ["plum", "bird"], "answer": 1},
    {"question": "Name a fruit.", "choices": ["apple pear", "two"], "answer": 0},
]
TRAIN = TrainConfig(template="qa", batch_size=4, max_length=64,
                    lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trainer():
    """A LoRA trainer on a 2-layer float64 Llama, its adapter's B made non-zero (`move_lora_b_off_zero`)."""
    t = tiny_float64_trainer(RECORDS, QUESTIONS, TRAIN, corpus=[" ".join(r["output"] for r in RECORDS)] * 10)
    t.reset(0)
    move_lora_b_off_zero(t.model, seed=1)
    t.model.eval()
    return t


@pytest.fixture(scope="module")
def batches(trainer):
    train = trainer._batch([trainer.encode(r) for r in RECORDS[:4]])
    dev = pad_rows(inrun.dev_rows(trainer.tokenizer, QUESTIONS), trainer.tokenizer.pad_token_id)
    return train, dev


def lora(model):
    return inrun.lora_parameters(model)


def row_sum_nll(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Summed NLL of one unpadded row, by hand (log_softmax and gather, float64)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(labels[1:])
    keep = target != -100
    return -torch.log_softmax(logits, -1)[keep].gather(1, target[keep, None]).sum()


def grads_of(model, loss) -> torch.Tensor:
    """The flat gradient of `loss` over the LoRA parameters, by plain autograd."""
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [p for _, p in lora(model)])])


def reference_train_grads(model, rows) -> torch.Tensor:
    """Row i's gradient computed alone: its summed NLL over the batch's label-token count."""
    total = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in rows)
    return torch.stack([grads_of(model, row_sum_nll(model, ids, lab) / total) for ids, lab in rows])


def reference_dev_grads(model, rows) -> torch.Tensor:
    """Question q's gradient computed alone: its mean NLL over its gold tokens."""
    return torch.stack([grads_of(model, row_sum_nll(model, ids, lab) / sum(x != -100 for x in lab[1:]))
                        for ids, lab in rows])


def test_pad_rows_is_the_trainers_batch(trainer):
    rows = [trainer.encode(r) for r in RECORDS]
    ours, theirs = pad_rows(rows, trainer.tokenizer.pad_token_id), trainer._batch(rows)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_lora_parameters_are_the_adapter_and_nothing_else_is_trainable(trainer):
    names = [n for n, _ in lora(trainer.model)]
    assert len(names) == 2 * 3 * 2 and all("lora_A" in n or "lora_B" in n for n in names)  # 2 layers x 3 modules
    embedding = trainer.model.get_input_embeddings().weight
    embedding.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="nn.Linear"):
            inrun.lora_parameters(trainer.model)
    finally:
        embedding.requires_grad_(False)


def test_per_example_grads_and_their_products_equal_one_example_at_a_time(trainer, batches):
    model, (train, _) = trainer.model, batches
    rows = [trainer.encode(r) for r in RECORDS[:4]]
    got = inrun.per_example_grads(model, train)
    reference = reference_train_grads(model, rows)
    assert torch.allclose(got.flat(), reference, rtol=1e-9, atol=1e-12)
    assert reference.abs().max() > 1e-3 and all(g.abs().max() > 0 for g in got.grads.values())  # A and B alike
    assert torch.allclose(got.flat() @ got.flat().T, reference @ reference.T, rtol=1e-9, atol=1e-14)
    # The examples' gradients add up to the gradient of the batch loss as Hugging Face computes it.
    hf_loss = model(**train).loss
    assert got.loss == pytest.approx(hf_loss.item(), rel=1e-6)
    hf_grad = grads_of(model, hf_loss)  # HF takes its loss over float32 logits: equal to float32 precision
    assert torch.allclose(got.flat().sum(0), hf_grad, rtol=0, atol=1e-6 * float(hf_grad.abs().max()))
    assert torch.allclose(torch.cat([g.flatten() for g in got.batch_grad.values()]), got.flat().sum(0), atol=1e-12)


def test_dev_rows_score_as_gold_loglik_and_their_grads_are_per_question(trainer, batches):
    model, (_, dev) = trainer.model, batches
    got = inrun.per_example_grads(model, dev, "example")
    _, per_question = gold_loglik(model, trainer.tokenizer, QUESTIONS)
    assert np.allclose(-got.losses.numpy(), per_question, rtol=1e-5)
    rows = inrun.dev_rows(trainer.tokenizer, QUESTIONS)
    assert torch.allclose(got.flat(), reference_dev_grads(model, rows), rtol=1e-9, atol=1e-12)
    weights = inrun.token_weights(dev)
    assert weights.sum() == pytest.approx(1) and np.array_equal(weights * inrun.response_tokens(dev).sum(),
                                                                inrun.response_tokens(dev))


def test_step_credits_add_up_to_the_batch_first_order_term(trainer, batches):
    model, (train, dev) = trainer.model, batches
    lr = 0.05
    step = inrun.step_credits(model, train, dev, lr)
    assert step.credits.shape == (4, len(QUESTIONS)) and step.credits.dtype == np.float64
    rows = [trainer.encode(r) for r in RECORDS[:4]]
    total = sum(int(n) for n in inrun.response_tokens(train))
    batch_grad = grads_of(model, sum(row_sum_nll(model, ids, lab) for ids, lab in rows) / total)
    dev_grads = reference_dev_grads(model, inrun.dev_rows(trainer.tokenizer, QUESTIONS))
    assert np.allclose(step.credits.sum(0), lr * (dev_grads @ batch_grad).numpy(), rtol=1e-9, atol=1e-14)
    # Each credit is that example's own term, against the per-example reference.
    reference = lr * reference_train_grads(model, rows) @ dev_grads.T
    assert np.allclose(step.credits, reference.numpy(), rtol=1e-9, atol=1e-14)
    # The streamed contraction equals the materialised one, in any dev chunking.
    train_grads = inrun.per_example_grads(model, train)
    dev_example = inrun.per_example_grads(model, dev, "example")
    assert np.allclose(inrun.credits_from_grads(train_grads, dev_example, lr), step.credits, rtol=1e-10, atol=1e-16)
    assert np.allclose(inrun.step_credits(model, train, dev, lr, dev_chunk=2).credits, step.credits,
                       rtol=1e-10, atol=1e-16)
    assert np.allclose(step.dev_losses, dev_example.losses.numpy(), rtol=1e-12)
    assert step.loss == pytest.approx(train_grads.loss, rel=1e-12)


def test_the_sign_positive_credit_lowers_the_dev_loss(trainer, batches):
    """An SGD step of size lr moves each question's loss by minus its credits' sum, up to O(lr²)."""
    model, (train, dev) = trainer.model, batches
    before = {n: p.detach().clone() for n, p in lora(model)}

    def residual(lr: float) -> np.ndarray:
        step = inrun.step_credits(model, train, dev, lr)
        try:
            with torch.no_grad():
                for name, p in lora(model):
                    p.sub_(lr * step.grad[name])
            after = inrun.per_example_grads(model, dev, "example").losses.numpy()
        finally:
            with torch.no_grad():
                for name, p in lora(model):
                    p.copy_(before[name])
        change = after - step.dev_losses
        assert np.all(np.sign(change) == -np.sign(step.credits.sum(0)))
        return change + step.credits.sum(0)

    # The rest is second order: ~100x smaller for a 10x smaller step (a smaller one would reach the
    # float32 noise floor of Llama's RMSNorm, which runs in float32 even in a float64 model).
    coarse, fine = residual(1e-3), residual(1e-4)
    assert np.all(np.abs(fine) < np.abs(coarse) / 30), (coarse, fine)


def test_padding_and_masked_labels_contribute_nothing(trainer, batches):
    model, (train, dev) = trainer.model, batches
    step = inrun.step_credits(model, train, dev, 0.1)
    # Seven more columns of junk tokens, masked and unlabelled, and junk under the existing padding.
    generator = torch.Generator().manual_seed(0)
    extra = 7
    wide = {k: torch.cat([v, torch.full((v.shape[0], extra), fill, dtype=v.dtype)], 1)
            for (k, v), fill in zip(train.items(), [0, -100, 0])}
    pad = wide["attention_mask"] == 0
    wide["input_ids"][pad] = torch.randint(0, 300, (int(pad.sum()),), generator=generator)
    padded = inrun.step_credits(model, wide, dev, 0.1)
    assert np.allclose(padded.credits, step.credits, rtol=1e-10, atol=1e-16)
    assert padded.loss == pytest.approx(step.loss, rel=1e-12)
    # A row whose labels are all masked gets no credit and leaves the others' unchanged.
    rows = [trainer.encode(r) for r in RECORDS[:4]]
    silent = [(ids, [-100] * len(lab)) for ids, lab in rows[:1]] + rows[1:]
    muted = inrun.step_credits(model, trainer._batch(silent), dev, 0.1)
    alone = inrun.step_credits(model, trainer._batch(rows[1:]), dev, 0.1)
    assert np.all(muted.credits[0] == 0)
    assert np.allclose(muted.credits[1:], alone.credits, rtol=1e-10, atol=1e-16)


def test_step_credits_are_deterministic_and_leave_grad_and_modes_alone(trainer, batches):
    model, (train, dev) = trainer.model, batches
    sentinel = {n: torch.full_like(p, 7.0) for n, p in lora(model)}
    for name, p in lora(model):
        p.grad = sentinel[name].clone()
    model.train()
    try:
        first = inrun.step_credits(model, train, dev, 0.1)
        second = inrun.step_credits(model, train, dev, 0.1)
        assert all(m.training for m in model.modules())  # train mode restored after the eval-mode dev pass
        assert all(torch.equal(p.grad, sentinel[n]) for n, p in lora(model))
    finally:
        model.eval()
    assert np.array_equal(first.credits, second.credits) and np.array_equal(first.dev_losses, second.dev_losses)
    assert first.loss == second.loss and all(torch.equal(first.grad[n], second.grad[n]) for n in first.grad)
    # write_grads leaves what loss.backward() would.
    inrun.write_grads(model, first.grad)
    got = {n: p.grad.clone() for n, p in lora(model)}
    for _, p in lora(model):
        p.grad = None
    model(**train).loss.backward()
    assert all(torch.allclose(got[n], p.grad, rtol=0, atol=1e-6 * float(p.grad.abs().max())) for n, p in lora(model))
    for _, p in lora(model):
        p.grad = None


def test_a_bfloat16_base_with_a_float32_adapter(trainer):
    """The CUDA setting (bf16 base, fp32 adapter), on CPU: per-example gradients in float32, adding up."""
    base = tiny.build_model(BaseConfig(vocab_size=300, hidden_size=32, layers=2, heads=2, intermediate_size=64,
                                       max_length=64, pretrain_steps=0), trainer.tokenizer).to(torch.bfloat16)
    t = LoraTrainer(base, trainer.tokenizer, TRAIN)
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    named = lora(t.model)
    assert {p.dtype for _, p in named} == {torch.float32}
    train = t._batch([t.encode(r) for r in RECORDS[:3]])
    got = inrun.per_example_grads(t.model, train)
    assert got.flat().dtype == torch.float32
    reference = grads_of(t.model, t.model(**train).loss)
    assert torch.allclose(got.flat().sum(0), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
    dev = pad_rows(inrun.dev_rows(trainer.tokenizer, QUESTIONS), trainer.tokenizer.pad_token_id)
    assert np.all(np.isfinite(inrun.step_credits(t.model, train, dev, 0.01).credits))


def test_clip_coefficient_is_torchs():
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert inrun.clip_coefficient(grads, 0) == 1.0 and inrun.clip_coefficient(grads, 10.0) == 1.0
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(params, grads.values()):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert inrun.clip_coefficient(grads, 1.0) == pytest.approx(float(params[0].grad[0] / 3.0), rel=1e-6)


def test_adam_preconditioner_is_adams_denominator_and_its_credits_add_up(trainer, batches):
    """With β1 = 0, AdamW's step is exactly -lr · P ⊙ g: P is the denominator Adam uses at this step."""
    model, (train, dev) = trainer.model, batches
    named = lora(model)
    before = {n: p.detach().clone() for n, p in named}
    optimizer = torch.optim.AdamW([p for _, p in named], lr=0.01, betas=(0.0, 0.999), weight_decay=0.0)
    try:
        for _ in range(2):  # one step with an empty state, one with a warm one
            step = inrun.step_credits(model, train, dev, 0.01)
            precondition = inrun.adam_preconditioner(optimizer, named, step.grad)
            start = {n: p.detach().clone() for n, p in named}
            inrun.write_grads(model, step.grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for name, p in named:
                assert torch.allclose(p.detach() - start[name], -0.01 * precondition[name] * step.grad[name],
                                      rtol=1e-6, atol=1e-12)
        adam = inrun.step_credits(model, train, dev, 0.01, preconditioner=precondition)
        dev_grads = inrun.per_example_grads(model, dev, "example")
        flat_p = torch.cat([precondition[n].flatten() for n, _ in named])
        batch = torch.cat([adam.grad[n].flatten() for n, _ in named])
        assert np.allclose(adam.credits.sum(0), 0.01 * (dev_grads.flat() @ (flat_p * batch)).numpy(), rtol=1e-9)
        assert not np.allclose(adam.credits, inrun.step_credits(model, train, dev, 0.01).credits)
    finally:
        with torch.no_grad():
            for name, p in named:
                p.copy_(before[name])
                p.grad = None


# --- the accumulator -----------------------------------------------------------------------------

def filled() -> inrun.InRunCredits:
    """3 players, 2 dev questions, 3 runs; each player's per-run totals are known by construction."""
    acc = inrun.InRunCredits(["a", "b", 7], n_dev=2, runs=3)
    for run in range(3):
        acc.add(run, ["a", "b"], np.array([[1.0, 2.0], [run, -1.0]]))
        acc.add(run, [7, "a", "a"], torch.tensor([[0.5, 0.5], [run, 0.0], [1.0, 1.0]]))  # "a" twice in a batch
    return acc


def test_accumulator_means_and_stderr_over_runs():
    acc = filled()
    # a: run r totals (1 + r + 1, 2 + 0 + 1) = (2 + r, 3); b: (r, -1); 7: (0.5, 0.5).
    vector = acc.vector_result()
    assert np.array_equal(vector.values["a"], [3.0, 3.0]) and np.array_equal(vector.values["b"], [1.0, -1.0])
    assert np.array_equal(vector.values[7], [0.5, 0.5])
    assert [list(c) for c in vector.credits["a"]] == [[2.0, 3.0], [3.0, 3.0], [4.0, 3.0]]
    assert np.allclose(vector.stderr["a"], [1 / math.sqrt(3), 0.0])
    assert np.allclose(vector.stderr["b"], [1 / math.sqrt(3), 0.0])
    assert [e["a"][0] for e in vector.estimates] == [2.0, 2.5, 3.0]  # running means after each run
    assert vector.evaluations_made == [2, 4, 6] and vector.evaluations == {}
    scalar = acc.result(np.array([0.25, 0.75]))
    assert scalar.values == {"a": 3.0, "b": -0.5, 7: 0.5}
    assert scalar.credits["b"] == [-0.75, -0.5, -0.25]
    assert scalar.stderr["b"] == pytest.approx(0.25 / math.sqrt(3))
    # Local games: local_values over the vector result, as the retrain engine's are read.
    local = local_values(vector, {"a": np.array([0]), "b": np.array([0, 1]), 7: np.array([1])})
    assert local.values == {"a": 3.0, "b": 0.0, 7: 0.5}
    assert local.stderr["a"] == pytest.approx(1 / math.sqrt(3))
    one = acc.vector_result(runs=1)
    assert np.array_equal(one.values["a"], [2.0, 3.0]) and np.all(np.isnan(one.stderr["a"]))


def test_accumulator_rejects_bad_shapes_and_players():
    acc = inrun.InRunCredits(["a"], n_dev=2, runs=1)
    with pytest.raises(ValueError, match="shape"):
        acc.add(0, ["a"], np.zeros((1, 3)))
    with pytest.raises(KeyError):
        acc.add(0, ["z"], np.zeros((1, 2)))
    with pytest.raises(ValueError, match="weights"):
        acc.result(np.ones(3))
    with pytest.raises(TypeError):
        inrun.InRunCredits([("a", 1)], n_dev=1, runs=1).state()


def test_accumulator_state_round_trips_and_resumes_exactly():
    import json

    acc = filled()
    arrays, meta = acc.state()
    assert all(isinstance(v, np.ndarray) and v.flags["C_CONTIGUOUS"] for v in arrays.values())
    meta = json.loads(json.dumps(meta))
    back = inrun.InRunCredits.from_state({k: v.copy() for k, v in arrays.items()}, meta)
    assert back.players == ["a", "b", 7]
    a, b = acc.vector_result(), back.vector_result()
    assert all(np.array_equal(a.values[p], b.values[p]) and np.array_equal(a.stderr[p], b.stderr[p], equal_nan=True)
               for p in acc.players)
    # Stopped after run 0's first step, resumed from the saved state: the same totals bit for bit.
    partial = inrun.InRunCredits(["a", "b", 7], n_dev=2, runs=3)
    partial.add(0, ["a", "b"], np.array([[1.0, 2.0], [0.0, -1.0]]))
    resumed = inrun.InRunCredits.from_state(*partial.state())
    resumed.add(0, [7, "a", "a"], np.array([[0.5, 0.5], [0.0, 0.0], [1.0, 1.0]]))
    for run in (1, 2):
        resumed.add(run, ["a", "b"], np.array([[1.0, 2.0], [run, -1.0]]))
        resumed.add(run, [7, "a", "a"], np.array([[0.5, 0.5], [run, 0.0], [1.0, 1.0]]))
    assert np.array_equal(resumed.totals, acc.totals) and np.array_equal(resumed.steps, acc.steps)
    with pytest.raises(ValueError, match="version"):
        inrun.InRunCredits.from_state(arrays, {**meta, "version": 0})
    with pytest.raises(ValueError, match="shape"):
        inrun.InRunCredits.from_state(arrays, {**meta, "runs": 2})
