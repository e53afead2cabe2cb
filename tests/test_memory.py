"""shed.memory and what it bounds: passes chunked by tokens leave every score as it was, dev items are cut at
their cap and the cut is reported, the model's shape is read without loading it, the peak estimate stays
within a stated factor of a measured peak, and a stage that cannot fit is refused before its model loads."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, records_dev_inputs, tiny_float64_trainer, tiny_random_lm
from hypothesis import given, settings
from hypothesis import strategies as st

from shed import inrun, memory
from shed.config import LoraConfig, Params, TrainConfig, load_params
from shed.fileio import ShedError
from shed.losses import response_losses
from shed.scoring import cut_rows, token_logliks
from shed.training import LoraTrainer, pad_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WORDS = "plum dog bird red blue green one two three apple pear seven".split()


def long_record(i: int, words: int) -> dict:
    output = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))
    return {"id": f"d{i}-{words}", "instruction": f"Repeat the list {i}.", "input": "", "output": output}


# --- chunks --------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30), st.integers(0, 5), st.integers(0, 120))
def test_chunks_cover_the_rows_in_order_within_both_bounds_and_as_full_as_they_allow(lengths, max_rows, max_tokens):
    out = memory.chunks(lengths, max_rows, max_tokens)
    assert [i for start, stop in out for i in range(start, stop)] == list(range(len(lengths)))
    for k, (start, stop) in enumerate(out):
        rows, width = stop - start, max(lengths[start:stop])
        assert not max_rows or rows <= max_rows
        assert not max_tokens or rows * width <= max_tokens or rows == 1  # a row too long by itself goes alone
        if k + 1 < len(out):  # the next row did not fit: greedy, so no more passes than needed
            wider = max(width, lengths[stop])
            assert (max_rows and rows + 1 > max_rows) or (max_tokens and (rows + 1) * wider > max_tokens)
    assert memory.chunk_shapes(lengths, max_rows, max_tokens) == [(b - a, max(lengths[a:b])) for a, b in out]


def test_the_worst_chunk_of_unknown_rows_fills_the_token_bound_at_the_longest_row():
    assert memory.worst_chunk(16, 128) == (16, 128)
    assert memory.worst_chunk(16, 128, 1000) == (7, 128)
    assert memory.worst_chunk(16, 5000, 1000) == (1, 5000)


def test_scores_do_not_depend_on_the_chunking_beyond_float_rounding():
    model, tokenizer = tiny_random_lm()
    records = [long_record(i, n) for i, n in enumerate([3, 40, 7, 90, 12, 1, 60, 25])]
    rows = [(tokenizer(r["instruction"])["input_ids"], tokenizer(" " + r["output"])["input_ids"]) for r in records]
    whole = token_logliks(model, tokenizer, rows, 64)
    for max_tokens in (150, 60, 1):  # 1: every row alone
        chunked = token_logliks(model, tokenizer, rows, 64, max_tokens=max_tokens)
        assert [n for _, n in chunked] == [n for _, n in whole]
        assert np.allclose([s for s, _ in chunked], [s for s, _ in whole], rtol=1e-5, atol=1e-4)
    losses = response_losses(model, tokenizer, records, "qa", 256, 8)
    assert np.allclose(response_losses(model, tokenizer, records, "qa", 256, 8, max_tokens=100), losses, rtol=1e-5)


def test_dev_passes_chunked_by_tokens_give_each_items_loss_gradient_and_credit_unchanged():
    dev = [long_record(i, n) for i, n in enumerate([2, 30, 5, 18, 9])]
    train = TrainConfig(template="qa", batch_size=4, max_length=64,
                        lora=LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]))
    trainer = tiny_float64_trainer(dev, [], train)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)
    batch = pad_rows(inrun.dev_rows(trainer.tokenizer, dev, "qa"), trainer.tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(inrun.dev_chunks(batch, 0, 40)) > 2  # the bound splits this dev set
    grads, losses = inrun.dev_gradients(trainer.model, batch)
    chunked, chunked_losses = inrun.dev_gradients(trainer.model, batch, 0, 40)
    assert np.allclose(chunked_losses, losses, rtol=1e-12)
    assert np.allclose(inrun.dev_losses(trainer.model, batch, 2, 40), losses, rtol=1e-12)
    assert all(torch.allclose(chunked[n], grads[n], rtol=1e-10, atol=1e-14) for n in grads)
    rows = {n: g[:2] for n, g in grads.items()}  # two items' gradients as a step's training rows
    dots, _ = inrun.contract_dev(trainer.model, rows, batch)
    assert torch.allclose(inrun.contract_dev(trainer.model, rows, batch, 0, max(lengths))[0], dots, rtol=1e-10)


# --- the dev cap ---------------------------------------------------------------------------------

def test_a_dev_row_is_cut_at_the_end_as_training_cuts_a_record_and_the_cut_is_counted():
    rows = [([1, 2, 3], [4, 5, 6, 7]), ([1], [2]), ([1, 2, 3, 4, 5], [6])]
    assert cut_rows(rows, 5) == [([1, 2, 3], [4, 5]), ([1], [2]), ([1, 2, 3, 4, 5], [])]
    assert cut_rows(rows, 0) == rows and cut_rows(rows, None) == rows
    cut = memory.Cut.of([7, 2, 6], 5)
    assert (cut.cut, cut.tokens_cut, cut.most_cut, cut.tokens_max, cut.lengths) == (2, 3, 2, 5, [5, 2, 5])
    assert cut.metrics() == {"dev_max_length": 5, "dev_truncated": 2, "dev_tokens_cut": 3, "dev_tokens_max": 5}
    assert cut.describe("dev items", "shapley.dev_max_length") == (
        "2 of 3 dev items cut at 5 tokens (shapley.dev_max_length): 3 tokens dropped, up to 2 from one")
    assert memory.Cut.of([7, 2], 0).describe("dev items", "x") is None


# --- the model's shape, read without loading it ----------------------------------------------------

def test_the_shape_read_from_config_and_header_is_the_loaded_models(tmp_path):
    model, tokenizer = tiny_random_lm()
    model.save_pretrained(tmp_path, safe_serialization=True)
    shape = memory.read_shape(str(tmp_path))
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert (shape.hidden, shape.layers, shape.vocab, shape.max_positions) == (32, 1, len(tokenizer), 256)
    cfg = TrainConfig(lora=LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))
    trainer = LoraTrainer(model, tokenizer, cfg)
    trainable = sum(p.numel() for _, p in trainer.trainable())
    assert shape.lora_parameters(4, cfg.lora.target_modules) == trainable
    # Without the weights' header: a Llama's count and linears from config.json alone.
    arithmetic = memory.shape_from_config(json.loads((tmp_path / "config.json").read_text()))
    assert arithmetic.parameters == shape.parameters
    assert arithmetic.lora_parameters(4, cfg.lora.target_modules) == trainable
    assert memory.read_shape(str(tmp_path / "nowhere.gguf")) is None and memory.read_shape("./no_such_model") is None


def test_a_refusal_is_one_line_naming_the_estimate_and_the_settings_that_shrink_its_largest_parts():
    shape = memory.ModelShape(parameters=135_000_000, hidden=576, intermediate=1536, layers=30, vocab=49152,
                              max_positions=8192, linears=tuple((f"layers.{i}.mlp.down_proj", 1536, 576)
                                                                for i in range(30)))
    params = Params()
    params.shapley.method, params.shapley.dev_every, params.shapley.dev_chunk = "inrun", 4, 8
    estimate = memory.inrun_estimate(params, shape, "cpu", [1500] * 16, 128)
    assert estimate.parts[0].what == "dev pass"  # 5 long items a chunk (8192 tokens) outweigh all else
    assert memory.inrun_estimate(params, shape, "cpu", [150] * 16, 128).parts[0].what == "training pass"
    problem = estimate.problem("shapley", 22.8e9)
    assert "\n" not in problem
    assert problem.startswith(f"shapley: estimated peak {estimate.total / 1e9:.1f} GB > 22.8 GB available (")
    # The dev pass alone is more than the excess: its settings, largest first.
    assert problem.endswith("; lower shapley.chunk_tokens (8192) or shapley.dev_max_length (0 = 8192) or "
                            "shapley.dev_chunk (8)")
    # More must go than the dev pass holds: the next part's settings too (at most five settings named).
    assert estimate.problem("shapley", 1e9).endswith("; lower shapley.chunk_tokens (8192) or shapley.dev_max_length "
                                                     "(0 = 8192) or shapley.dev_chunk (8) or train.batch_size (16) "
                                                     "or train.lora.r (16)")
    assert estimate.problem("shapley", estimate.total) is None and estimate.problem("shapley", None) is None
    # Halving the tokens a chunk holds more than halves the dev pass (the mask is quadratic in the width).
    params.shapley.chunk_tokens = 4096
    assert memory.inrun_estimate(params, shape, "cpu", [1500] * 16, 128).total < estimate.total


# --- the estimate against a measured peak ----------------------------------------------------------

@pytest.mark.slow
def test_the_inrun_estimate_is_within_a_quarter_of_the_measured_peak_for_dev_records_far_longer_than_training(
        tmp_path):
    """benchmarks/memory.py's measurement: the in-run valuation (16 records, one step, dev_every 4, dev_chunk 8)
    of 16 dev records of 1,000-token responses (train.max_length 128) in a fresh process, its peak resident set
    (VmHWM) against the estimate the stage would check, runtime included."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/memory.py"), "--dev", "16", "--response", "1000",
                             "--cache", str(tmp_path)], capture_output=True, text=True, check=True)
    run = json.loads(result.stdout.splitlines()[0])
    assert run["dev_tokens_max"] > 1000 and run["estimate_parts_gb"]["dev pass"] > 0.2
    assert 0.8 <= run["rss_gb"] / run["estimate_gb"] <= 1.25, run
    assert abs(run["maxrss_gb"] - run["rss_gb"]) < 0.05  # wait4's ru_maxrss agrees with the child's own VmHWM


# --- the stages refuse up front --------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_dev_inputs(tmp_path_factory):
    """prepare (a dev file of records far longer than train.max_length), base (512 positions), embed and cluster
    in-process, tiny: the shapley stage's inputs."""
    dev = [{k: v for k, v in long_record(i, words).items() if k != "id"} for i, words in enumerate([40, 200, 700, 30])]
    return records_dev_inputs(tmp_path_factory.mktemp("long-dev"), dev, {
        "prepare": {"embedded": {"pool_size": 40}}, "base": {"pretrain_steps": 0, "max_length": 512},
        "cluster": {"C": 4}, "shapley": {"method": "inrun", "k": 1, "dev_neighbours": 0, "dev_every": 2}})


@pytest.fixture
def long_dev(long_dev_inputs, tmp_path, monkeypatch):
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(long_dev_inputs, ws)
    monkeypatch.chdir(ws)
    return ws


def test_a_shapley_run_that_cannot_fit_is_refused_before_its_model_loads_and_writes_nothing(long_dev, monkeypatch):
    from shed import models
    from shed.stages import shapley

    monkeypatch.setattr(memory, "available_bytes", lambda device: 10**8)
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ShedError) as refused:
        shapley.main(load_params("params.yaml"))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("shapley: estimated peak ")
    assert "> 0.1 GB available" in message and "; lower " in message
    assert not (long_dev / "data/shapley").exists() and not (long_dev / "data/shapley_jobs").exists()
    assert not (long_dev / "metrics/shapley.json").exists()


def test_sample_finetune_and_evaluate_refuse_before_their_model_loads(long_dev, monkeypatch):
    from shed import artifacts, models
    from shed.stages import evaluate, finetune, sample

    monkeypatch.setattr(memory, "available_bytes", lambda device: 10**8)
    for module in (models, finetune, evaluate):
        monkeypatch.setattr(module, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    params = load_params("params.yaml")
    with pytest.raises(ShedError, match=r"^sample: estimated peak .* > 0.1 GB available .*; lower "
                                        r"shapley.chunk_tokens \(8192\)"):
        sample.record_losses(params, artifacts.read_pool()[:8])
    monkeypatch.setattr(artifacts, "read_curated", lambda: artifacts.read_pool()[:8])
    with pytest.raises(ShedError, match=r"^finetune: estimated peak .* > 0.1 GB available .*; lower "
                                        r"train.micro_batch_size \(0 = 16\)"):
        finetune.main(params)
    assert not (long_dev / "models/finetuned").exists()
    with pytest.raises(ShedError, match=r"^evaluate: estimated peak .* > 0.1 GB available .*; lower "
                                        r"evaluate.batch_size \(32\)"):
        evaluate.main(params)
    assert not (long_dev / "metrics/eval.json").exists()


def test_the_dev_records_cut_at_the_cap_are_reported_and_every_pass_stays_within_it(long_dev, caplog, monkeypatch):
    from shed.stages import shapley

    passes = []  # (rows, width) of every dev pass
    rows_of = inrun._rows
    monkeypatch.setattr(inrun, "_rows", lambda batch, start, stop: passes.append(
        tuple(rows_of(batch, start, stop)["input_ids"].shape)) or rows_of(batch, start, stop))
    params = load_params("params.yaml")
    params.shapley.dev_max_length, params.shapley.chunk_tokens = 200, 300
    with caplog.at_level("INFO"):
        shapley.main(params)
    assert passes and max(width for _, width in passes) == 200
    assert all(rows * width <= 300 or rows == 1 for rows, width in passes)
    m = json.loads((long_dev / "metrics/shapley.json").read_text())
    assert (m["dev_max_length"], m["dev_truncated"], m["dev_tokens_max"]) == (200, 2, 200)
    assert m["dev_tokens_cut"] > 400 and m["memory_estimate_gb"] > 0.5
    assert "2 of 4 dev items (data/prepared/dev.jsonl) cut at 200 tokens (shapley.dev_max_length)" in caplog.text
    assert "shapley: estimated peak memory " in caplog.text
    # 0 is the model's own limit (512 positions): the 700-word record is cut there, and that is said too.
    params.shapley.dev_max_length = 0
    cut = shapley.dev_cut(params, load_tokenizer_of(params), [long_record(2, 700)], 512)
    assert (cut.cap, cut.cut, cut.tokens_max) == (512, 1, 512)
    params.shapley.dev_max_length = 1024
    with pytest.raises(ShedError, match="^params.yaml: shapley.dev_max_length: 1024 exceeds the model's own limit "
                                        "of 512 tokens"):
        shapley.dev_cut(params, load_tokenizer_of(params), [long_record(2, 700)], 512)


def load_tokenizer_of(params):
    from shed.models import load_tokenizer

    return load_tokenizer(params.shapley.model)
