"""shed.training in-process, on a really tiny random Llama: the invariants the Shapley utility relies on.

v(S) must be a function of S alone: the epoch order is keyed by record id, an adapter reset gives back
the base model, and the same records and seed give the same adapter bit for bit.
"""

import copy
import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shed import tiny
from shed.config import BaseConfig, LoraConfig, TrainConfig
from shed.prompts import render
from shed.training import LoraTrainer, epoch_order

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "apple", "pear", "plum"]
RECORDS = [
    {"id": f"r{i}", "instruction": f"Name a {kind}.", "input": "" if i % 2 else "quickly", "output": answer}
    for i, (kind, answer) in enumerate([("colour", "red"), ("animal", "dog"), ("number", "three"),
                                        ("fruit", "plum"), ("colour", "blue"), ("animal", "bird")])
]
TRAIN = TrainConfig(template="qa", epochs=8, lr=2e-2, batch_size=3, max_length=64, lora=LoraConfig(r=4, alpha=8))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base():
    """(tokenizer, an unwrapped base model never trained): trainers wrap deep copies of it."""
    corpus = [" ".join(WORDS)] * 20 + [render(r, "qa")[0] + render(r, "qa")[1] for r in RECORDS] * 10
    tokenizer = tiny.train_tokenizer(corpus, 300)
    model = tiny.build_model(BaseConfig(vocab_size=300, hidden_size=32, layers=1, heads=2, intermediate_size=64,
                                        max_length=64, pretrain_steps=0), tokenizer)
    # A random Llama's head (std 0.02) on RMS-normalised hidden states caps the logits near +-0.6, so no
    # adapter could lower the loss much below log(vocab): a larger head leaves it room to learn.
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def trainer(base):
    tokenizer, model = base
    return LoraTrainer(copy.deepcopy(model), tokenizer, TRAIN)


def probe(tokenizer):
    return torch.tensor([tokenizer("Question: Name a colour.\nAnswer: red", add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k}


@torch.no_grad()
def mean_loss(trainer, records) -> float:
    trainer.model.eval()
    batch = trainer._batch([trainer.encode(r) for r in records])
    return trainer.model(**batch).loss.item()


# --- epoch_order ---------------------------------------------------------------------------------

IDS = st.lists(st.text(min_size=1, max_size=8), min_size=0, max_size=25, unique=True)


@settings(max_examples=60, deadline=None)
@given(ids=IDS, extra=st.text(min_size=1, max_size=8), where=st.integers(min_value=0), seed=st.integers(0, 2**31),
       epoch=st.integers(0, 50))
def test_adding_a_record_keeps_the_others_relative_order(ids, extra, where, seed, epoch):
    if extra in ids:
        return
    where %= len(ids) + 1
    grown = ids[:where] + [extra] + ids[where:]
    before = [ids[i] for i in epoch_order(ids, seed, epoch)]
    after = [grown[i] for i in epoch_order(grown, seed, epoch)]
    assert sorted(epoch_order(grown, seed, epoch)) == list(range(len(grown)))  # a permutation of the indices
    assert [x for x in after if x != extra] == before


@settings(max_examples=50, deadline=None)
@given(ids=IDS, seed=st.integers(0, 2**31))
def test_epoch_order_depends_on_the_ids_not_on_their_list_order(ids, seed):
    # The same set of records listed in another order is visited in the same order of ids.
    shuffled = list(reversed(ids))
    assert [ids[i] for i in epoch_order(ids, seed, 3)] == [shuffled[i] for i in epoch_order(shuffled, seed, 3)]


def test_epoch_order_is_deterministic_per_seed_and_epoch_and_differs_across_them():
    ids = [f"rec-{i}" for i in range(30)]
    assert epoch_order(ids, 7, 0) == epoch_order(list(ids), 7, 0)
    orders = {(seed, epoch): tuple(epoch_order(ids, seed, epoch)) for seed in range(3) for epoch in range(4)}
    assert len(set(orders.values())) == len(orders)  # 12 distinct shuffles of 30 records
    assert all(sorted(o) == list(range(30)) for o in orders.values())
    assert orders[(0, 0)] != tuple(range(30))  # actually shuffled
    assert epoch_order([], 0, 0) == [] and epoch_order(["x"], 0, 0) == [0]


# --- encode --------------------------------------------------------------------------------------

@pytest.mark.parametrize("responses_only", [True, False])
def test_encode_masks_the_prompt_and_appends_eos(base, responses_only):
    tokenizer, model = base
    cfg = TrainConfig(template="qa", responses_only=responses_only, max_length=64, lora=TRAIN.lora)
    t = LoraTrainer(copy.deepcopy(model), tokenizer, cfg)
    record = RECORDS[0]
    prompt, response = render(record, "qa")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids, labels = t.encode(record)
    assert ids == prompt_ids + response_ids + [tokenizer.eos_token_id]  # no BOS, EOS last
    expected_prompt_labels = [-100] * len(prompt_ids) if responses_only else prompt_ids
    assert labels == expected_prompt_labels + response_ids + [tokenizer.eos_token_id]
    assert t.encode(record) is t.encode(dict(record))  # cached by id


def test_encode_truncates_ids_and_labels_to_max_length(base):
    tokenizer, model = base
    t = LoraTrainer(copy.deepcopy(model), tokenizer, TrainConfig(template="qa", max_length=5, lora=TRAIN.lora))
    ids, labels = t.encode(RECORDS[1])
    assert len(ids) == len(labels) == 5 and labels == [-100] * 5  # the prompt alone is longer than 5 tokens


# --- reset and fit -------------------------------------------------------------------------------

def test_reset_gives_back_the_base_model_and_depends_on_the_seed_alone(base, trainer):
    tokenizer, model = base
    ids = probe(tokenizer)
    expected = logits(model, ids)
    trainer.fit(RECORDS[:2], seed=1)
    assert not torch.equal(logits(trainer.model, ids), expected)  # the fit changed the model ...
    trainer.reset(5)
    assert torch.equal(logits(trainer.model, ids), expected)  # ... and the reset undid it exactly
    first = lora_state(trainer.model)
    assert all(torch.count_nonzero(v) == 0 for k, v in first.items() if "lora_B" in k)
    assert all(torch.count_nonzero(v) > 0 for k, v in first.items() if "lora_A" in k)
    trainer.fit(RECORDS, seed=2)
    trainer.reset(5)
    second = lora_state(trainer.model)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    trainer.reset(6)
    other = lora_state(trainer.model)
    assert any(not torch.equal(first[k], other[k]) for k in first if "lora_A" in k)


def test_fit_lowers_the_training_loss_and_trains_only_the_adapter(trainer):
    trainer.reset(0)
    before = mean_loss(trainer, RECORDS)
    frozen = base_state(trainer.model)
    result = trainer.fit(RECORDS, seed=0)
    after = mean_loss(trainer, RECORDS)
    assert result["steps"] == math.ceil(len(RECORDS) / TRAIN.batch_size) * TRAIN.epochs == 16
    assert after < before - 2.0, (before, after)  # ~7.1 -> ~3.6
    assert math.isfinite(result["loss"]) and result["loss"] < before
    assert not trainer.model.training  # left in eval mode for scoring
    now = base_state(trainer.model)
    assert all(torch.equal(frozen[k], now[k]) for k in frozen)  # the base weights never move


def test_fit_is_deterministic_in_records_and_seed(base, trainer):
    tokenizer, model = base
    first = trainer.fit(RECORDS[:4], seed=3)
    a = lora_state(trainer.model)
    trainer.fit(RECORDS[2:], seed=9)  # something else in between
    second = trainer.fit(RECORDS[:4], seed=3)
    b = lora_state(trainer.model)
    assert first["loss"] == second["loss"] and first["steps"] == second["steps"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A separate trainer (another process would build its own) gives the same bits.
    fresh = LoraTrainer(copy.deepcopy(model), tokenizer, TRAIN)
    fresh.fit(RECORDS[:4], seed=3)
    c = lora_state(fresh.model)
    assert all(torch.equal(a[k], c[k]) for k in a)
    # The list order of the records does not matter (the epoch order is keyed by id) ...
    trainer.fit(list(reversed(RECORDS[:4])), seed=3)
    assert all(torch.equal(a[k], v) for k, v in lora_state(trainer.model).items())
    # ... but the seed does.
    trainer.fit(RECORDS[:4], seed=4)
    assert any(not torch.equal(a[k], v) for k, v in lora_state(trainer.model).items())


def test_fit_on_nothing_is_the_base_model(base, trainer):
    tokenizer, model = base
    trainer.fit(RECORDS, seed=0)
    calls = []

    class Progress:
        def update(self, n):
            calls.append(n)

    result = trainer.fit([], seed=0, progress=Progress())
    assert result["steps"] == 0 and math.isnan(result["loss"]) and calls == []
    ids = probe(tokenizer)
    assert torch.equal(logits(trainer.model, ids), logits(model, ids))


def test_progress_counts_every_step(trainer):
    calls = []

    class Progress:
        def update(self, n):
            calls.append(n)

    result = trainer.fit(RECORDS[:3], seed=0, progress=Progress())
    assert result["steps"] == 1 * TRAIN.epochs and calls == [1] * result["steps"]


# --- mid-fit checkpoints -------------------------------------------------------------------------

class Killed(Exception):
    """Raised by `Kept.save` at its `stop_at` step: the fit ends there, as under a kill."""


def through_store(state: dict) -> dict:
    """A state as the shapley stage stores and reads it back: tensors through safetensors, the rest through JSON."""
    from safetensors.torch import load, save

    return {"tensors": load(save({k: v.contiguous() for k, v in state["tensors"].items()})),
            "meta": json.loads(json.dumps(state["meta"]))}


class Kept:
    """A `shed.training.Checkpoint` kept in memory: due after every step; with `stop_at`, the fit is
    killed right after saving the state of that step."""

    def __init__(self, state: dict | None = None, stop_at: int | None = None):
        self.state, self.stop_at, self.saved = state, stop_at, []

    def load(self):
        return self.state

    def due(self, step):
        return True

    def save(self, state):
        self.state = through_store(state)
        self.saved.append(state["meta"]["step"])
        if state["meta"]["step"] == self.stop_at:
            raise Killed


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_fit_killed_mid_run_resumes_in_a_fresh_trainer_bit_for_bit(base, dropout):
    """fit(5 of 16 steps) -> saved state -> a fresh trainer loads it and finishes: the uninterrupted fit's
    adapter and loss, bit for bit (with LoRA dropout too: the RNG state travels with the checkpoint)."""
    tokenizer, model = base
    cfg = dataclasses.replace(TRAIN, lora=dataclasses.replace(TRAIN.lora, dropout=dropout))
    plain = LoraTrainer(copy.deepcopy(model), tokenizer, cfg)
    expected = plain.fit(RECORDS, seed=4)
    assert expected["resumed_from"] == 0

    kept = Kept(stop_at=5)
    with pytest.raises(Killed):
        LoraTrainer(copy.deepcopy(model), tokenizer, cfg).fit(RECORDS, seed=4, checkpoint=kept)
    assert kept.saved == [1, 2, 3, 4, 5] and kept.state["meta"]["step"] == 5
    torch.manual_seed(1234)  # another process: the global RNG is anywhere
    fresh = LoraTrainer(copy.deepcopy(model), tokenizer, cfg)
    calls = []

    class Progress:
        def update(self, n):
            calls.append(n)

    again = Kept(state=kept.state)
    result = fresh.fit(RECORDS, seed=4, progress=Progress(), checkpoint=again)
    assert result["resumed_from"] == 5 and result["steps"] == expected["steps"] == 16
    assert sum(calls) == 16 and calls[0] == 5  # the bar starts where the resumed fit does
    assert result["loss"] == expected["loss"]
    got, want = lora_state(fresh.model), lora_state(plain.model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert again.saved == list(range(6, 16))  # it goes on checkpointing, never after the last step


def test_a_state_of_another_fit_is_refused(base):
    tokenizer, model = base
    kept = Kept(stop_at=2)
    trainer = LoraTrainer(copy.deepcopy(model), tokenizer, TRAIN)
    with pytest.raises(Killed):
        trainer.fit(RECORDS, seed=4, checkpoint=kept)
    with pytest.raises(ValueError, match="another seed"):
        trainer.fit(RECORDS, seed=5, checkpoint=Kept(state=kept.state))
    with pytest.raises(ValueError, match="another"):
        trainer.fit(RECORDS[:5], seed=4, checkpoint=Kept(state=kept.state))

    class Stateless:
        def before_step(self, step, batches, lr):
            return None

        def after_step(self, step, loss, lr):
            pass

    with pytest.raises(TypeError, match="state"):
        trainer.fit(RECORDS, seed=4, callback=Stateless(), checkpoint=Kept())
