"""The train recipe's GPU-facing knobs, checked on a CPU: each changes memory or padding, never the update.

- micro-batches with token-weighted accumulation give the full batch's loss and adapter (float tolerance);
- the default (one micro-batch per step, warmup_ratio 0.1) is the plain loop of before, bit for bit;
- gradient checkpointing recomputes the layers and gives the same gradients (with LoRA dropout too);
- group_by_length keeps each step's records (so its update) and shrinks padding, deterministically;
- the precision policy, the max_length limit, the config check, and round-robin worker placement.
"""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from shed import tiny
from shed.config import BaseConfig, LoraConfig, TrainConfig, load_params
from shed.fileio import ShedError
from shed.prompts import render
from shed.training import LoraTrainer, epoch_order, label_tokens, step_weights, warmup_steps

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "apple", "pear", "plum"]
# Responses of 1 to 7 words: micro-batches hold different numbers of label tokens, so weighting matters.
RECORDS = [{"id": f"r{i:02d}", "instruction": f"List {i % 7 + 1} words.", "input": "" if i % 3 else "now",
            "output": " ".join(WORDS[i % 5: i % 5 + i % 7 + 1])} for i in range(12)]
TRAIN = TrainConfig(template="qa", epochs=2, lr=2e-2, batch_size=6, max_length=64, lora=LoraConfig(r=4, alpha=8))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base():
    """(tokenizer, an unwrapped tiny Llama), as tests/test_trainer.py builds it: trainers wrap deep copies."""
    corpus = [" ".join(WORDS)] * 20 + ["".join(render(r, "qa")) for r in RECORDS] * 10
    tokenizer = tiny.train_tokenizer(corpus, 300)
    model = tiny.build_model(BaseConfig(vocab_size=300, hidden_size=32, layers=2, heads=2, intermediate_size=64,
                                        max_length=64, pretrain_steps=0), tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # room to learn (see tests/test_trainer.py)
    return tokenizer, model.eval()


def make(base, **changes) -> LoraTrainer:
    tokenizer, model = base
    lora = changes.pop("lora", TRAIN.lora)
    return LoraTrainer(copy.deepcopy(model), tokenizer, dataclasses.replace(TRAIN, lora=lora, **changes))


def lora_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}


def grads(trainer) -> dict[str, torch.Tensor]:
    return {k: v.grad.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}


def step_batches(trainer, step: int = 0):
    encoded = [trainer.encode(r) for r in RECORDS]
    return [trainer._batch([encoded[i] for i in rows]) for rows in trainer.schedule(RECORDS, 0)[step]]


def close(a: dict, b: dict, atol: float, rtol: float = 1e-4) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=rtol) for k in a)


def gradient_of_step(trainer, seed: int = 0, **reset) -> tuple[float, dict]:
    """One step's loss and accumulated gradient, from a fresh adapter with lora_B moved off zero (so
    lora_A's gradient is not zero too)."""
    trainer.reset(0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # LoRA dropout's masks
    loss = trainer.backward(step_batches(trainer))
    trainer.model.eval()
    return loss, grads(trainer)


# --- gradient accumulation -----------------------------------------------------------------------

def test_schedule_cuts_each_step_into_micro_batches_of_the_same_records(base):
    full, micro = make(base), make(base, micro_batch_size=2)
    whole, parts = full.schedule(RECORDS[:10], 0), micro.schedule(RECORDS[:10], 0)
    assert [[len(mb) for mb in step] for step in whole] == [[6], [4]] * TRAIN.epochs  # the epoch's last step smaller
    assert [[len(mb) for mb in step] for step in parts] == [[2, 2, 2], [2, 2]] * TRAIN.epochs
    assert [sum(step, []) for step in parts] == [step[0] for step in whole]


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_micro_batches_accumulate_to_the_full_batch_gradient(base, micro):
    full_loss, full_grad = gradient_of_step(make(base))
    trainer = make(base, micro_batch_size=micro)
    loss, grad = gradient_of_step(trainer)
    assert loss == pytest.approx(full_loss, rel=1e-6)
    assert close(grad, full_grad, atol=1e-7, rtol=1e-5)
    # Weighting matters: a plain mean of the micro-batches' mean losses is another loss.
    batches = step_batches(trainer)
    tokens = [label_tokens(b) for b in batches]
    assert len(set(tokens)) > 1 and sum(step_weights(batches)) == pytest.approx(1.0)
    with torch.no_grad():
        unweighted = sum(trainer.model(**b).loss.item() for b in batches) / len(batches)
    assert abs(unweighted - full_loss) > 1e-3


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_training_with_micro_batches_gives_the_full_batch_adapter(base, micro):
    full = make(base)
    expected = full.fit(RECORDS, seed=3)
    trainer = make(base, micro_batch_size=micro)
    result = trainer.fit(RECORDS, seed=3)
    assert result["steps"] == expected["steps"] == 4
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert close(lora_state(trainer), lora_state(full), atol=1e-4)  # weights ~0.2 after 4 Adam steps


def test_the_default_recipe_is_the_plain_loop_bit_for_bit(base):
    """micro_batch_size 0 (= batch_size), warmup_ratio 0.1: the loop before these knobs existed, written out."""
    trainer = make(base)
    trainer.fit(RECORDS, seed=5)
    new = lora_state(trainer)

    ref = make(base)
    ref.reset(5)
    encoded = [ref.encode(r) for r in RECORDS]
    ids = [r["id"] for r in RECORDS]
    steps = [order[b:b + TRAIN.batch_size] for epoch in range(TRAIN.epochs)
             for order in [epoch_order(ids, 5, epoch)] for b in range(0, len(order), TRAIN.batch_size)]
    params = [p for p in ref.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=TRAIN.lr, weight_decay=0.0)
    total, warmup = len(steps), max(1, len(steps) // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    ref.model.train()
    for rows in steps:
        loss = sum(ref.model(**batch).loss for batch in [ref._batch([encoded[i] for i in rows])])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, TRAIN.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    old = lora_state(ref)
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


# --- gradient checkpointing ----------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(base, dropout):
    lora = LoraConfig(r=4, alpha=8, dropout=dropout)
    plain = make(base, micro_batch_size=3, lora=lora)
    checkpointed = make(base, micro_batch_size=3, gradient_checkpointing=True, lora=lora)
    calls = {"plain": 0, "checkpointed": 0}
    for name, trainer in (("plain", plain), ("checkpointed", checkpointed)):
        # Count the layer's MLP forward itself: module hooks do not fire again in torch's recompute.
        mlp = next(m for n, m in trainer.model.named_modules() if n.endswith("layers.0.mlp"))

        def counted(*args, forward=mlp.forward, name=name, **kwargs):
            calls[name] += 1
            return forward(*args, **kwargs)

        mlp.forward = counted
    loss, grad = gradient_of_step(plain, seed=7)
    ckpt_loss, ckpt_grad = gradient_of_step(checkpointed, seed=7)
    assert calls == {"plain": 2, "checkpointed": 4}  # two micro-batches; recomputed in the backward
    assert ckpt_loss == pytest.approx(loss, rel=1e-6)
    assert close(ckpt_grad, grad, atol=1e-7, rtol=1e-5)  # dropout's masks are replayed in the recompute


def test_gradient_checkpointing_trains_the_same_adapter(base):
    plain, checkpointed = make(base), make(base, gradient_checkpointing=True, micro_batch_size=2)
    plain.fit(RECORDS, seed=1)
    checkpointed.fit(RECORDS, seed=1)
    assert close(lora_state(checkpointed), lora_state(plain), atol=1e-4)
    assert not checkpointed.model.training  # scoring runs without recomputation


# --- length grouping -----------------------------------------------------------------------------

def padding(trainer, steps) -> int:
    lengths = [len(trainer.encode(r)[0]) for r in RECORDS]
    return sum(len(mb) * max(lengths[i] for i in mb) - sum(lengths[i] for i in mb) for step in steps for mb in step)


def test_group_by_length_keeps_each_steps_records_and_only_cuts_padding(base):
    plain, grouped = make(base, micro_batch_size=2), make(base, micro_batch_size=2, group_by_length=True)
    a, b = plain.schedule(RECORDS, 0), grouped.schedule(RECORDS, 0)
    # What it preserves: the steps, in order, each with the same records (so the same update), and the
    # micro-batch sizes. What it changes: which records share a micro-batch, longest first.
    assert [sorted(sum(s, [])) for s in a] == [sorted(sum(s, [])) for s in b]
    assert [[len(mb) for mb in s] for s in a] == [[len(mb) for mb in s] for s in b]
    lengths = [len(grouped.encode(r)[0]) for r in RECORDS]
    assert all([lengths[i] for i in sum(s, [])] == sorted((lengths[i] for i in sum(s, [])), reverse=True) for s in b)
    assert padding(grouped, b) < padding(plain, a)
    # Deterministic: the same schedule again, from another trainer too, and for records listed in another order.
    again = make(base, micro_batch_size=2, group_by_length=True)
    assert grouped.schedule(RECORDS, 0) == b == again.schedule(RECORDS, 0)
    reordered = list(reversed(RECORDS))
    ids = [[[reordered[i]["id"] for i in mb] for mb in s] for s in again.schedule(reordered, 0)]
    assert ids == [[[RECORDS[i]["id"] for i in mb] for mb in s] for s in b]
    # One micro-batch per step: nothing to group, the schedule is the plain one.
    assert make(base, group_by_length=True).schedule(RECORDS, 0) == make(base).schedule(RECORDS, 0)


def test_group_by_length_trains_the_same_adapter(base):
    plain, grouped = make(base, micro_batch_size=2), make(base, micro_batch_size=2, group_by_length=True)
    plain.fit(RECORDS, seed=2)
    first = grouped.fit(RECORDS, seed=2)
    assert close(lora_state(grouped), lora_state(plain), atol=1e-4)
    state = lora_state(grouped)
    assert grouped.fit(RECORDS, seed=2)["loss"] == first["loss"]
    assert all(torch.equal(state[k], v) for k, v in lora_state(grouped).items())  # reproducible bit for bit


# --- warmup --------------------------------------------------------------------------------------

def test_warmup_ratio_point_one_is_the_old_tenth_of_the_steps_for_every_total():
    assert all(warmup_steps(total, 0.1) == max(1, total // 10) for total in range(0, 100_001))
    assert [warmup_steps(t, 0.04) for t in (1, 24, 25, 50, 99, 100, 1000)] == [1, 1, 1, 2, 3, 4, 40]
    assert warmup_steps(1000, 0.0) == 1 and warmup_steps(7, 0.3) == 2  # floor(2.1); 0.3 * 7 = 2.0999... in floats


def test_optimizer_schedule_uses_warmup_ratio(base):
    trainer = make(base, warmup_ratio=0.25)
    optimizer, scheduler = trainer.optimizer(8)
    rates = []
    for _ in range(8):
        rates.append(scheduler.get_last_lr()[0] / TRAIN.lr)
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


# --- precision, limits, config -------------------------------------------------------------------

def test_precision_policy_fp32_on_cpu(base):
    trainer = make(base)
    assert trainer.autocast is None and not trainer.scale_loss
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_precision_policy_half_base_fp32_adapter_and_autocast(base, dtype):
    tokenizer, model = base
    half = copy.deepcopy(model).to(dtype)
    trainer = LoraTrainer(half, tokenizer, dataclasses.replace(TRAIN, epochs=1, micro_batch_size=3))
    assert trainer.autocast == dtype and trainer.scale_loss == (dtype == torch.float16)
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == dtype for n, p in trainer.model.named_parameters() if n not in trainable)
    before = lora_state(trainer)
    result = trainer.fit(RECORDS, seed=0)
    assert result["steps"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    after = lora_state(trainer)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)  # it trained


def test_max_length_may_not_exceed_the_models_own(base):
    too_long = make(base, max_length=65)  # refused at the first record, before any training
    with pytest.raises(ShedError) as exc:
        too_long.fit(RECORDS, seed=0)
    assert str(exc.value) == ("train.max_length: 65 exceeds the model's own limit of 64 tokens "
                              "(max_position_embeddings)")
    assert make(base, max_length=0).max_length == 64 and make(base, max_length=64).max_length == 64
    long = {"id": "long", "instruction": " ".join(WORDS * 10), "input": "", "output": "red"}
    assert len(make(base, max_length=0).encode(long)[0]) == 64


@pytest.mark.parametrize("batch,micro", [(16, 5), (16, 32), (128, 12)])
def test_batch_size_must_be_a_multiple_of_micro_batch_size(tmp_path, batch, micro):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": batch, "micro_batch_size": micro}}))
    with pytest.raises(ShedError) as exc:
        load_params(path)
    assert str(exc.value) == (f"{path}: train.micro_batch_size: train.batch_size={batch} must be a multiple of it, "
                              f"got {micro}")
    path.write_text(yaml.safe_dump({"train": {"batch_size": 128, "micro_batch_size": 8}}))
    assert load_params(path).train.micro_batch == 8 and TrainConfig().micro_batch == 16


# --- several workers per device ------------------------------------------------------------------

def test_workers_are_placed_round_robin_over_the_gpus(monkeypatch):
    from shed.executors import worker_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    expected = ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert worker_devices("cuda", 7) == worker_devices("auto", 7) == expected
    assert worker_devices("cuda", 2) == ["cuda:0", "cuda:1"] and worker_devices("cuda", 1) == ["cuda"]
    assert worker_devices("cuda:1", 3) == ["cuda:1"] * 3 and worker_devices("cpu", 2) == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ShedError, match="no CUDA device"):
        worker_devices("cuda", 2)


# --- the finetune stage --------------------------------------------------------------------------

@pytest.mark.slow  # one fresh process running four stages (~40-120 s on 2 cores)
def test_finetune_stage_with_micro_batches_and_checkpointing(tmp_path):
    """`shed finetune` with micro-batches of 2 (batch 8), gradient checkpointing and length grouping trains
    the adapter the plain recipe trains (float tolerance). One process runs prepare and base, then finetune
    with each params file (`--params`), keeping the first adapter aside: one start-up instead of three."""
    from helpers import ROOT, TINY, merge
    from safetensors.torch import load_file

    def write_params(path, **train):
        params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
        params["train"].update({"epochs": 2, "batch_size": 8, **train})
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    ws = tmp_path / "ws"
    ws.mkdir()
    write_params(ws / "params.yaml")
    write_params(ws / "recipe.yaml", micro_batch_size=2, gradient_checkpointing=True, group_by_length=True)
    script = """
import json, shutil, sys
from pathlib import Path
from shed.cli import main

def stage(*argv):
    if main(list(argv)):
        sys.exit(f"shed {' '.join(argv)} failed")

stage("prepare"); stage("base")
pool = Path("data/prepared/pool.jsonl").read_text().splitlines()[:36]
Path("data/curated").mkdir(parents=True)
Path("data/curated/records.jsonl").write_text("".join(json.dumps({"id": json.loads(line)["id"]}) + "\\n" for line in pool))
stage("finetune", "--params", "recipe.yaml")
shutil.copytree("models/finetuned", "accumulated")
shutil.copy("metrics/finetune.json", "accumulated/metrics.json")
stage("finetune")  # params.yaml: the plain recipe, one batch of 8 per step, no checkpointing
"""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ws, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((ws / "accumulated/metrics.json").read_text())
    assert metrics["records"] == 36 and metrics["steps"] == 5 * 2  # ceil(36 / 8) steps x 2 epochs
    accumulated = load_file(ws / "accumulated/adapter_model.safetensors")
    plain = load_file(ws / "models/finetuned/adapter_model.safetensors")
    assert accumulated.keys() == plain.keys() and len(plain) > 0
    worst = max(float((accumulated[k] - plain[k]).abs().max()) for k in plain)
    # 1.1e-5 apart under SHED_PIN_KERNELS (MKL's AVX2 branch), under 1e-5 unpinned: summation order only.
    assert all(torch.allclose(accumulated[k], plain[k], atol=5e-5, rtol=1e-4) for k in plain), worst
    assert any(not torch.equal(accumulated[k], plain[k]) for k in plain)  # really another path to the same adapter
