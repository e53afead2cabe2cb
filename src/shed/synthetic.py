"""The embedded default: a generated instruction pool with known quality structure.

Three list skills (first word, last word, copy the list) that a tiny model picks up from a few
examples and that generalise across items, each phrased with four instruction templates, so
the pool is redundant the way real pools are. Planted harmful records (wrong answers, answers
to another instruction, garbage or truncated outputs) are concentrated in one "bad" template
per skill, so k-means clusters are mostly clean or mostly corrupted, and a model tuned on the
whole pool learns the wrong behaviour for those phrasings. Which records were corrupted goes
to a separate ground-truth file that the method never reads; benchmarks use it to score the method.

Everything is a pure function of the seed: same seed, same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shed.data import record_id
from shed.prompts import render

WORDS = (
    "apple bird boat book bread car cat chair cloud cup desk dog door egg fish flag flower fork frog "
    "girl goat hat horse house key kite lamp leaf lion moon mouse nest pen pig plate rain ring road "
    "rock rose sea sheep ship shoe sock star stone sun table tree truck wall water whale wheel wind"
).split()


@dataclass(frozen=True)
class Item:
    """One task instance: how it is asked, its answer, and the wrong answers that look plausible."""

    instruction: str
    input: str
    answer: str
    distractors: tuple[str, ...]
    words: tuple[str, ...]


def _word_list(rng: np.random.Generator, k: int) -> list[str]:
    return [WORDS[i] for i in rng.choice(len(WORDS), size=k, replace=False)]


def _position(index: int) -> Callable:
    def make(rng, template):
        words = _word_list(rng, int(rng.integers(4, 6)))
        answer = words[index]
        return Item(template, " ".join(words), answer, tuple(w for w in words if w != answer), tuple(words))

    return make


def _copy(rng, template):
    words = _word_list(rng, int(rng.integers(3, 5)))
    wrong: list[str] = [" ".join([words[1], words[0], *words[2:]])]  # the planted slip is always a choice
    while len(wrong) < 3:  # other orders of the same words
        cand = " ".join(words[i] for i in rng.permutation(len(words)))
        if cand != " ".join(words) and cand not in wrong:
            wrong.append(cand)
    return Item(template, " ".join(words), " ".join(words), tuple(wrong), tuple(words))


# family -> (generator, instruction templates). Templates within a family are paraphrases (the
# redundancy SHED is meant to remove) that share one key word (first, last, repeat), so a skill
# learnt from some transfers to the others; otherwise each is worded unlike any other, as a real
# pool's sources differ in style, so sentence embeddings group records by source, not word list.
FAMILIES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "first_word": (_position(0), (
        "What is the first word in the list?",
        "Quiz time! Look at this sequence and name the first item in it.",
        "Below you will find several nouns separated by spaces; reply with only the first one.",
        "From the vocabulary workbook, exercise A: write down the first entry of the list.")),
    "last_word": (_position(-1), (
        "What is the last word in the list?",
        "Pay attention to where the line of words stops, and tell me the last word standing there.",
        "Identify the last term of this series of items and say nothing else.",
        "Which of these words would a reader reach last when reading left to right?")),
    "copy": (_copy, (
        "Repeat the list.",
        "Echo the words exactly as they are given: repeat them, keeping their original order intact.",
        "Please repeat the following sequence of nouns faithfully.",
        "Say all of these words back to me, one after another; repeat them without changing anything.")),
}
SOURCES = [(family, t) for family, (_, templates) in FAMILIES.items() for t in range(len(templates))]
CORRUPTION_KINDS = ("wrong_answer", "other_instruction", "garbage")
# The answer to an instruction outside the skills ("how many words?"): a response to a different
# instruction that helps no question. (Answering another skill's question, first word for last,
# would also teach that skill, and its Shapley value could rightly come out positive.)
COUNTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
# A consistent slip, as from one careless annotator: the neighbouring word, two words swapped.
# Consistent harm is what a model learns (and what hurts it); random slips mostly average out.
WRONG_ANSWER = {"first_word": lambda w: w[1], "last_word": lambda w: w[-2],
                "copy": lambda w: " ".join([w[1], w[0], *w[2:]])}


def _make_item(rng: np.random.Generator, family: str, template: int) -> Item:
    make, templates = FAMILIES[family]
    return make(rng, templates[template])


def question_text(instruction: str, inp: str) -> str:
    """How an instruction and its input read as one question (matches the `qa` template)."""
    return f"{instruction}\nInput: {inp}" if inp else instruction


def _corrupt(rng: np.random.Generator, family: str, item: Item, kind: str) -> str:
    if kind == "wrong_answer":
        return WRONG_ANSWER[family](item.words)
    if kind == "other_instruction":
        return COUNTS[len(item.words)]
    letters = "bcdfghjklmnpqrstvwxz"  # garbage: a truncated answer followed by noise
    noise = "".join(letters[i] for i in rng.integers(len(letters), size=int(rng.integers(4, 9))))
    return item.answer[: max(1, len(item.answer) // 3)] + noise


def bad_sources(corrupt_fraction: float, seed: int) -> dict[int, str]:
    """Source index -> corruption kind for the planted bad sources.

    Bad sources are corrupted at 90%, the rest at 2%; their number solves 0.9 b + 0.02 (S - b) = f S.
    They are spread over the families (one per family first), so every skill keeps clean phrasings.
    """
    if corrupt_fraction <= 0:
        return {}
    rng = np.random.default_rng([seed, 2])
    n_bad = min(len(SOURCES), max(0, int(round((corrupt_fraction - 0.02) * len(SOURCES) / 0.88))))
    per_family = [[i for i, (f, _) in enumerate(SOURCES) if f == family] for family in FAMILIES]
    shuffled = [rng.permutation(f) for f in per_family]
    order = [int(f[r]) for r in range(max(map(len, shuffled))) for f in shuffled if r < len(f)]
    kinds = rng.permutation(len(CORRUPTION_KINDS))
    return {s: CORRUPTION_KINDS[kinds[j % len(kinds)]] for j, s in enumerate(order[:n_bad])}


def generate_pool(size: int, corrupt_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """The pool `{id, instruction, input, output}` and its ground truth `{id, family, source, corrupted, kind}`."""
    rng = np.random.default_rng([seed, 1])
    bad = bad_sources(corrupt_fraction, seed)
    records, truth, seen = [], [], set()
    attempts = 0
    while len(records) < size:
        attempts += 1
        if attempts > 50 * size:
            raise RuntimeError("could not generate enough distinct records; lower prepare.embedded.pool_size")
        s = int(rng.integers(len(SOURCES)))
        family, template = SOURCES[s]
        item = _make_item(rng, family, template)
        rate = 0.9 if s in bad else (0.02 if corrupt_fraction > 0 else 0.0)
        corrupted = bool(rng.random() < rate)
        kind = bad.get(s, CORRUPTION_KINDS[int(rng.integers(3))]) if corrupted else ""
        output = _corrupt(rng, family, item, kind) if corrupted else item.answer
        rid = record_id(item.instruction, item.input, output)
        if rid in seen:
            continue
        seen.add(rid)
        records.append({"id": rid, "instruction": item.instruction, "input": item.input, "output": output})
        truth.append({"id": rid, "family": family, "source": f"{family}/{template}", "corrupted": corrupted,
                      "kind": kind})
    return records, truth


def generate_questions(size: int, seed: int, salt: int) -> list[dict]:
    """Multiple-choice questions `{id, question, choices, answer}` over every family and template.

    `salt` separates the dev set (Shapley value function) from the eval set; questions that
    collide across the two are removed from the eval set by the caller.
    """
    rng = np.random.default_rng([seed, salt])
    out, seen = [], set()
    while len(out) < size:
        family, template = SOURCES[len(out) % len(SOURCES)]
        item = _make_item(rng, family, template)
        question = question_text(item.instruction, item.input)
        choices = [item.answer, *rng.choice(item.distractors, size=3, replace=False)]
        order = rng.permutation(len(choices))
        choices = [str(choices[i]) for i in order]
        qid = record_id(question, *choices)
        if qid in seen:
            continue
        seen.add(qid)
        out.append({"id": qid, "question": question, "choices": choices, "answer": int(np.argmax(order == 0))})
    return out


# The base's side task: none of the pool's skills, all of its format (answers are list words).
ANIMALS = ("bird", "cat", "dog", "fish", "frog", "goat", "horse", "lion", "mouse", "pig", "sheep", "whale")
ANIMAL_QUESTION = "Name the animal in the list."
QA_SHARE = 0.3
# The pool's skills, asked in words no pool template uses (why: pretraining_corpus).
SKILL_QUESTIONS = {"first_word": "Give the first word.", "last_word": "Give the last word.", "copy": "Give the words again."}
SKILL_SHARE = 0.3


def pretraining_corpus(n_lines: int, seed: int) -> list[str]:
    """Text for briefly pre-training the tiny base: word lists, each said twice; (QA_SHARE of the
    lines) one question-answer task outside the pool's skills; (SKILL_SHARE) the pool's three
    skills, asked in words no pool template uses.

    The repeats teach the vocabulary and copying. The side task ("name the animal in the list")
    teaches the answer format, one word of the list then EOS. The skill lines make the base what
    a pretrained LLM is before instruction tuning: it can do the tasks but not yet for every
    phrasing, so fine-tuning teaches which skill each phrasing asks for. A clean record then
    confirms what the base knows and a corrupted one contradicts it (README: "Does it work?").
    """
    rng = np.random.default_rng([seed, 7])
    lines = []
    for _ in range(n_lines):
        draw = rng.random()
        if draw < SKILL_SHARE:
            family = list(SKILL_QUESTIONS)[int(rng.integers(len(SKILL_QUESTIONS)))]
            item = FAMILIES[family][0](rng, SKILL_QUESTIONS[family])
            qa = {"instruction": item.instruction, "input": item.input, "output": item.answer}
        elif draw < SKILL_SHARE + QA_SHARE:
            animal = ANIMALS[int(rng.integers(len(ANIMALS)))]
            words = [w for w in _word_list(rng, 8) if w not in ANIMALS][: int(rng.integers(3, 5))]
            words.insert(int(rng.integers(len(words) + 1)), animal)
            qa = {"instruction": ANIMAL_QUESTION, "input": " ".join(words), "output": animal}
        else:
            words = " ".join(_word_list(rng, int(rng.integers(3, 9))))
            lines.append(f"{words}. {words}.")  # said twice: brief pretraining grows copying (induction) heads
            continue
        # Rendered by the `qa` template that fine-tuning and scoring use, so the format is theirs.
        prompt, response = render(qa, "qa")
        lines.append(prompt + response)
    return lines
