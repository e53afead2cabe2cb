"""The embedded pool: deterministic, 20-30% planted harm, concentrated in a few sources."""

import collections
import json

import pytest

from shed import synthetic


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_planted_harm_is_a_quarter_of_the_pool_and_concentrated(seed):
    records, truth = synthetic.generate_pool(1200, 0.25, seed)
    bad = synthetic.bad_sources(0.25, seed)
    corrupted = [t for t in truth if t["corrupted"]]
    assert 0.20 <= len(corrupted) / len(records) <= 0.30
    index = {f"{family}/{template}": i for i, (family, template) in enumerate(synthetic.SOURCES)}
    in_bad = sum(index[t["source"]] in bad for t in corrupted)
    assert in_bad / len(corrupted) > 0.9
    # One bad phrasing per skill, each with its own kind of harm: every skill keeps clean phrasings.
    assert len(bad) == 3 and sorted(bad.values()) == sorted(synthetic.CORRUPTION_KINDS)
    assert {synthetic.SOURCES[s][0] for s in bad} == set(synthetic.FAMILIES)


def test_truth_matches_what_the_records_say():
    records, truth = synthetic.generate_pool(600, 0.25, 5)
    for record, t in zip(records, truth):
        words = record["input"].split()
        right = {"first_word": words[0], "last_word": words[-1], "copy": " ".join(words)}[t["family"]]
        if t["kind"] == "other_instruction":
            assert record["output"] == synthetic.COUNTS[len(words)]
        assert (record["output"] != right) == t["corrupted"], (record, t)
        assert record["id"] == t["id"]


def test_the_pool_is_a_pure_function_of_the_seed():
    a, b = synthetic.generate_pool(300, 0.25, 7), synthetic.generate_pool(300, 0.25, 7)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(synthetic.generate_pool(300, 0.25, 8)) != json.dumps(a)


def test_questions_cover_every_source_with_a_valid_answer():
    questions = synthetic.generate_questions(120, seed=0, salt=3)
    instructions = collections.Counter(q["question"].split("\nInput:")[0] for q in questions)
    assert len(instructions) == len(synthetic.SOURCES)
    for q in questions:
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4 and 0 <= q["answer"] < 4


def test_pretraining_teaches_the_format_and_the_skills_in_words_no_pool_template_uses():
    from shed.synthetic import (
        ANIMAL_QUESTION,
        ANIMALS,
        SKILL_QUESTIONS,
        pretraining_corpus,
    )

    corpus = pretraining_corpus(900, seed=0)
    qa = [line.rsplit("\nAnswer: ", 1) for line in corpus if line.startswith("Question:")]
    animal = [(q, a) for q, a in qa if ANIMAL_QUESTION in q]
    skill = {family: [(q, a) for q, a in qa if ask in q] for family, ask in SKILL_QUESTIONS.items()}
    assert len(animal) + sum(map(len, skill.values())) == len(qa)
    assert 0.2 < len(animal) / len(corpus) < 0.4 and 0.2 < sum(map(len, skill.values())) / len(corpus) < 0.4
    for question, answer in animal:
        listed = question.split("\nInput: ")[1].split()
        assert answer in listed and [w for w in listed if w in ANIMALS] == [answer]  # exactly one right answer
    for family, lines in skill.items():
        assert lines
        for question, answer in lines:
            listed = question.split("\nInput: ")[1].split()
            assert answer == {"first_word": listed[0], "last_word": listed[-1], "copy": " ".join(listed)}[family]
    pool, _ = synthetic.generate_pool(300, 0.25, seed=0)
    # The pool's phrasings are never pretrained: fine-tuning still has to map each one to its skill.
    assert not {r["instruction"] for r in pool} & {ANIMAL_QUESTION, *SKILL_QUESTIONS.values()}
    assert pretraining_corpus(900, seed=0) == corpus
