"""A dev set of instruction records (prepare.dev): read in any pool layout, refused where it overlaps the
pool, valued by the mean per-token log-likelihood of its reference responses under the training prompt,
in both Shapley engines (retrain and inrun)."""

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import records_dev_inputs, tiny_random_lm

from shed import inrun, tiny
from shed.config import BaseConfig, LoraConfig, ShapleyConfig, TrainConfig, load_params
from shed.data import record_id
from shed.fileio import ShedError
from shed.mcdata import question_key, refuse_overlap
from shed.prompts import Span, render, spans
from shed.scoring import dev_kind, gold_loglik, response_loglik, response_rows
from shed.training import LoraTrainer, pad_rows

RECORDS = [
    {"id": "a", "instruction": "Name a colour.", "input": "", "output": "red"},
    {"id": "b", "instruction": "Give the first word.", "input": "plum dog bird", "output": "plum"},
    {"id": "c", "instruction": "Count the words.", "input": "one two three four", "output": "four words in all"},
]
QUESTIONS = [{"id": "q", "question": "Name a colour.", "choices": ["red", "dog"], "answer": 0}]
CONVERSATION = {"id": "d", "instruction": "Name a colour.", "input": "", "output": "red", "messages": [
    {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"},
    {"role": "user", "content": "Give the first word."}, {"role": "assistant", "content": "plum"}]}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def lm():
    return tiny_random_lm()


def by_hand(model, tokenizer, record, template):
    """(sum of log p, tokens) of the record's response and EOS after its prompt: one unpadded sequence."""
    prompt, response = render(record, template, tokenizer)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].float(), -1)
    return sum(logprobs[len(p) - 1 + j, t].item() for j, t in enumerate(r)), len(r)


@pytest.mark.parametrize("template", ["qa", "alpaca"])
def test_a_records_loglik_is_the_per_token_mean_over_its_response_given_the_training_prompt(lm, template):
    model, tokenizer = lm
    sums, counts = zip(*(by_hand(model, tokenizer, r, template) for r in RECORDS))
    assert len(set(counts)) > 1  # responses of different lengths: the batch below is padded
    prompts = [spans(r, template, tokenizer) for r in RECORDS]
    mean, per_record = response_loglik(model, tokenizer, prompts, batch_size=2)
    assert per_record == pytest.approx([s / n for s, n in zip(sums, counts)], abs=1e-4)
    assert mean == pytest.approx(sum(sums) / sum(counts), abs=1e-4)  # over all tokens, as gold_loglik
    one_at_a_time = [response_loglik(model, tokenizer, [p], batch_size=1)[1][0] for p in prompts]
    assert one_at_a_time == pytest.approx(per_record, abs=1e-5)


def test_dev_rows_are_the_trainers_own_encoding_and_their_losses_the_records_logliks(lm):
    _, tokenizer = lm
    model = tiny.build_model(BaseConfig(vocab_size=320, hidden_size=32, layers=1, heads=2, intermediate_size=64),
                             tokenizer)  # its own: the trainer puts an adapter into it
    train = TrainConfig(template="alpaca", responses_only=True, max_length=0,
                        lora=LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
    trainer = LoraTrainer(model, tokenizer, train)
    dev = RECORDS + [CONVERSATION]
    rows = inrun.dev_rows(tokenizer, dev, "alpaca")
    assert rows == [trainer.encode(r) for r in dev]  # the prompt training uses, the response + EOS (every reply)
    batch = pad_rows(rows, tokenizer.pad_token_id)
    losses = inrun.dev_losses(trainer.model, batch)  # reduction "example": each record's own mean
    mean, per_record = response_loglik(trainer.model, tokenizer, [spans(r, "alpaca", tokenizer) for r in dev])
    assert -losses == pytest.approx(per_record, abs=1e-5)
    assert float(-(inrun.token_weights(batch) @ losses)) == pytest.approx(mean, abs=1e-5)
    with pytest.raises(ValueError, match="train.template"):
        inrun.dev_rows(tokenizer, RECORDS)


def test_questions_still_score_as_before(lm):
    model, tokenizer = lm
    assert dev_kind(QUESTIONS) == "choices" and dev_kind(RECORDS) == "records"
    rows = inrun.dev_rows(tokenizer, QUESTIONS)  # no EOS, the " choice" continuation
    assert rows[0][1][-1] != tokenizer.eos_token_id
    _, per_question = gold_loglik(model, tokenizer, QUESTIONS)
    assert -inrun.dev_losses(model, pad_rows(rows, tokenizer.pad_token_id)) == pytest.approx(per_question, abs=1e-5)
    assert response_rows(tokenizer, [[Span("Q"), Span(" a", reply=True, eos=True)]])[0][1][-1] == tokenizer.eos_token_id
    # The eval-overlap check (prepare, evaluate) compares questions only: records have none.
    refuse_overlap(RECORDS, {question_key("Name a colour.", ["red", "dog"])}, "dev.jsonl", "eval.jsonl")
    with pytest.raises(ShedError, match="1 dev questions also appear in the eval set"):
        refuse_overlap(QUESTIONS, {question_key("Name a colour.", ["red", "dog"])}, "dev.jsonl", "eval.jsonl")


def test_value_functions_that_need_choices_are_refused_for_records():
    for value in ("choice_logprob", "accuracy"):
        problem = ShapleyConfig(value=value).dev_problem("records")
        assert f"{value} scores the answer choices" in problem and "use loglik" in problem
        assert ShapleyConfig(value=value).dev_problem("choices") is None
    assert ShapleyConfig(value="loglik").dev_problem("records") is None


# --- prepare -----------------------------------------------------------------------------------------

POOL = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Name a color.", "input": "", "output": "Blue"}]
DEV = [{"instruction": "Add 1 and 1.", "input": "", "output": "2"},
       {"instruction": "Name a fruit.", "output": "Plum"},
       {"instruction": "Add 1 and 1.", "input": "", "output": "2"}]  # an exact duplicate counts once


def prepare_in(tmp_path, monkeypatch, dev_name, dev_text, **prepare):
    from shed.stages import prepare as stage

    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in POOL))
    (tmp_path / dev_name).write_text(dev_text)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"pool": "pool.jsonl", "dev": dev_name,
                                                                      **prepare}}))
    monkeypatch.chdir(tmp_path)
    stage.main(load_params("params.yaml"))
    return [json.loads(line) for line in (tmp_path / "data/prepared/dev.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name, text", [
    ("dev.jsonl", "".join(json.dumps(r) + "\n" for r in DEV)),
    ("dev.json", json.dumps(DEV)),  # a JSON array
    ("dev.csv", "instruction,input,output\nAdd 1 and 1.,,2\nName a fruit.,,Plum\n"),
    ("dolly.jsonl", "".join(json.dumps({"instruction": r["instruction"], "context": r.get("input", ""),
                                        "response": r["output"]}) + "\n" for r in DEV)),
    ("chat.jsonl", "".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                    {"role": "assistant", "content": r["output"]}]}) + "\n"
                           for r in DEV)),  # single exchanges: single-turn records
])
def test_prepare_reads_an_instruction_dev_file_in_the_pools_layouts(tmp_path, monkeypatch, name, text):
    dev = prepare_in(tmp_path, monkeypatch, name, text)
    assert dev == [{"id": record_id("Add 1 and 1.", "", "2"), "instruction": "Add 1 and 1.", "input": "", "output": "2"},
                   {"id": record_id("Name a fruit.", "", "Plum"), "instruction": "Name a fruit.", "input": "",
                    "output": "Plum"}]
    assert json.loads((tmp_path / "metrics/prepare.json").read_text())["dev"] == 2


def test_a_dev_conversation_is_kept_whole_with_the_pools_id(tmp_path, monkeypatch):
    from shed.data import content_id

    row = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                             for m in CONVERSATION["messages"]]}
    dev = prepare_in(tmp_path, monkeypatch, "dev.jsonl", json.dumps(row) + "\n")
    assert dev == [{**CONVERSATION, "id": content_id(CONVERSATION)}]


def test_a_multiple_choice_dev_file_is_still_read_as_questions(tmp_path, monkeypatch):
    dev = prepare_in(tmp_path, monkeypatch, "dev.jsonl", json.dumps({"question": "2+2?", "choices": ["3", "4"],
                                                                     "answer": "B"}) + "\n")
    assert dev == [{"id": record_id("2+2?", "3", "4"), "question": "2+2?", "choices": ["3", "4"], "answer": 1}]


def test_a_dev_record_in_the_pool_stops_prepare_naming_the_first(tmp_path, monkeypatch):
    rows = [DEV[0], {**POOL[1], "input": ""}, POOL[0]]
    with pytest.raises(ShedError, match=r"^dev\.jsonl: line 2: dev record [0-9a-f]{16} is also in the pool pool\.jsonl "
                                        r"\(dev records in the pool: 2 of 3\)"):
        prepare_in(tmp_path, monkeypatch, "dev.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert not (tmp_path / "data/prepared").exists()  # nothing written


# --- the shapley stage, both engines, on an instruction dev set --------------------------------------

@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """prepare (a records dev file), base, embed and cluster in-process, tiny: the shapley stage's inputs."""
    dev = [{"instruction": "Give the first word.", "input": "plum dog bird", "output": "plum"},
           {"instruction": "Give the last word.", "input": "red blue green", "output": "green"},
           {"instruction": "Repeat the words.", "input": "one two", "output": "one two"},
           {"instruction": "Name a colour.", "input": "", "output": "red"}]
    return records_dev_inputs(tmp_path_factory.mktemp("dev-records"), dev, {
        "prepare": {"embedded": {"pool_size": 40}}, "base": {"pretrain_steps": 0}, "cluster": {"C": 4},
        "shapley": {"k": 1, "n": 2, "dev_neighbours": 2}})


@pytest.mark.parametrize("method", ["retrain", "inrun"])
def test_the_shapley_stage_values_the_proxies_on_an_instruction_dev_set(stage_inputs, tmp_path, monkeypatch, method):
    import shutil

    from shed.stages import shapley

    ws = tmp_path / "ws"
    shutil.copytree(stage_inputs, ws)
    monkeypatch.chdir(ws)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["shapley"]["method"] = method
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dev = [json.loads(line) for line in (ws / "data/prepared/dev.jsonl").read_text().splitlines()]
    assert dev_kind(dev) == "records" and len(dev) == 4
    shapley.main(load_params("params.yaml"))
    scores = (ws / "data/shapley/scores.csv").read_text().splitlines()
    assert scores[0] == "cluster,proxy_id,size,score,stderr,credits" and len(scores) == 1 + 4
    values = [float(line.split(",")[3]) for line in scores[1:]]
    assert all(np.isfinite(values)) and len(set(values)) > 1
    m = json.loads((ws / "metrics/shapley.json").read_text())
    assert m["method"] == method and m["value"] == "loglik" and m["v_full"] != m["v_empty"]
    assert -20 < m["v_empty"] < 0  # a mean per-token log-likelihood of the responses


def test_the_shapley_stage_refuses_a_choice_value_for_records(stage_inputs, tmp_path, monkeypatch):
    import shutil

    from shed.stages import shapley

    ws = tmp_path / "ws"
    shutil.copytree(stage_inputs, ws)
    monkeypatch.chdir(ws)
    params = load_params("params.yaml")
    params.shapley.value = "choice_logprob"
    with pytest.raises(ShedError, match="^params.yaml: shapley.value: choice_logprob scores the answer choices"):
        shapley.main(params)
