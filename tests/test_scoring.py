"""Value functions of the Shapley stage, on a tiny random Llama (no training needed)."""

import json

import pytest
import torch
from helpers import choice_sums, tiny_random_lm

from shed import synthetic
from shed.scoring import (
    LmEvalScorer,
    choice_logprob,
    context_and_choices,
    gold_loglik,
    mc_task_config,
)


@pytest.fixture(scope="module")
def lm():
    return tiny_random_lm()


@pytest.fixture(scope="module")
def questions():
    return synthetic.generate_questions(24, seed=3, salt=5)


def test_choice_logprob_is_the_mean_log_softmax_of_the_gold_choice(lm, questions):
    model, tokenizer = lm
    expected = [torch.log_softmax(choice_sums(model, tokenizer, q), 0)[q["answer"]].item() for q in questions]
    mean, per_question = choice_logprob(model, tokenizer, questions, batch_size=5)
    assert per_question == pytest.approx(expected, abs=1e-4)
    assert mean == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_choice_logprob_picks_what_lm_eval_accuracy_picks(lm, questions, tmp_path):
    model, tokenizer = lm
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    scores = LmEvalScorer(tokenizer, [mc_task_config("shed_dev", data)])(model)["shed_dev"]
    argmax = [int(choice_sums(model, tokenizer, q).argmax()) == q["answer"] for q in questions]
    assert scores["acc"] == pytest.approx(sum(argmax) / len(questions))
    assert scores["n"] == len(questions) == 24


def test_gold_loglik_is_per_token_over_the_gold_choices(lm, questions):
    model, tokenizer = lm
    sums, counts = [], []
    for q in questions:
        sums.append(choice_sums(model, tokenizer, q)[q["answer"]].item())
        counts.append(len(tokenizer(context_and_choices(q)[1][q["answer"]], add_special_tokens=False)["input_ids"]))
    mean, per_question = gold_loglik(model, tokenizer, questions, batch_size=7)
    assert mean == pytest.approx(sum(sums) / sum(counts), abs=1e-4)  # over all tokens, not a mean of means
    assert per_question == pytest.approx([s / n for s, n in zip(sums, counts)], abs=1e-4)
