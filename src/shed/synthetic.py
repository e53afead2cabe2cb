"""The embedded default: a generated instruction pool with known quality structure.

Seven task families (word-list skills and small fact tables) that a tiny model can learn on a
CPU, each phrased with several instruction templates, so the pool is redundant the way real
pools are. A planted share of harmful records (wrong answers, answers to another instruction,
garbage or truncated outputs) is concentrated in some (family, template) sources, so k-means
clusters are mostly clean or mostly corrupted. Which records were corrupted goes to a separate
ground-truth file that the method never reads; benchmarks use it to score the method.

Everything is a pure function of the seed: same seed, same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shed.data import record_id

WORDS = (
    "apple bird boat book bread car cat chair cloud cup desk dog door egg fish flag flower fork frog "
    "girl goat hat horse house key kite lamp leaf lion moon mouse nest pen pig plate rain ring road "
    "rock rose sea sheep ship shoe sock star stone sun table tree truck wall water whale wheel wind"
).split()
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens",
    "Cuba": "Havana", "Chile": "Santiago", "Poland": "Warsaw", "Russia": "Moscow", "Ireland": "Dublin",
    "Canada": "Ottawa", "China": "Beijing", "India": "Delhi", "Austria": "Vienna", "Portugal": "Lisbon",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "old": "new",
    "happy": "sad", "hard": "soft", "wet": "dry", "early": "late", "open": "closed", "full": "empty",
    "loud": "quiet", "rich": "poor", "strong": "weak", "tall": "short", "thick": "thin", "clean": "dirty",
    "left": "right", "win": "lose",
}  # fmt: skip
COLORS = {
    "banana": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black", "blood": "red",
    "orange": "orange", "lemon": "yellow", "leaf": "green", "sea": "blue", "milk": "white", "crow": "black",
    "tomato": "red", "cherry": "red", "lime": "green", "ink": "black", "cloud": "white", "plum": "purple",
    "grape": "purple", "carrot": "orange",
}  # fmt: skip


@dataclass(frozen=True)
class Item:
    """One task instance: how it is asked, its answer, and the wrong answers that look plausible."""

    instruction: str
    input: str
    answer: str
    distractors: tuple[str, ...]


def _word_list(rng: np.random.Generator, k: int) -> list[str]:
    return [WORDS[i] for i in rng.choice(len(WORDS), size=k, replace=False)]


def _others(rng: np.random.Generator, pool: list[str], answer: str, k: int = 3) -> tuple[str, ...]:
    cands = sorted(set(pool) - {answer})
    return tuple(cands[i] for i in rng.choice(len(cands), size=k, replace=False))


def _first(rng, template):
    words = _word_list(rng, 4)
    return Item(template, " ".join(words), words[0], tuple(words[1:]))


def _last(rng, template):
    words = _word_list(rng, 4)
    return Item(template, " ".join(words), words[-1], tuple(words[:-1]))


def _repeat(rng, template):
    word = _word_list(rng, 1)[0]
    return Item(template, word, word, _others(rng, WORDS, word))


def _count(rng, template):
    k = int(rng.integers(2, 7))
    return Item(template, " ".join(_word_list(rng, k)), NUMBER_WORDS[k], _others(rng, NUMBER_WORDS[2:8], NUMBER_WORDS[k]))


def _table(table: dict[str, str]) -> Callable:
    keys, values = sorted(table), sorted(set(table.values()))

    def make(rng, template):
        key = keys[int(rng.integers(len(keys)))]
        return Item(template.format(key), "", table[key], _others(rng, values, table[key]))

    return make


# family -> (generator, instruction templates). Templates within a family are paraphrases:
# the redundancy SHED is meant to remove.
FAMILIES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "first_word": (_first, ("What is the first word in the list?", "Name the first word of this list.",
                            "Which word comes first?")),
    "last_word": (_last, ("What is the last word in the list?", "Name the last word of this list.",
                          "Which word comes last?")),
    "repeat": (_repeat, ("Repeat the word.", "Say this word again.", "Copy the word exactly.")),
    "count": (_count, ("How many words are in the list?", "Count the words in this list.",
                       "What is the number of words given?")),
    "capital": (_table(CAPITALS), ("What is the capital of {}?", "Name the capital city of {}.",
                                   "Which city is the capital of {}?")),
    "opposite": (_table(OPPOSITES), ("What is the opposite of {}?", "Give the antonym of {}.",
                                     "Which word means the reverse of {}?")),
    "color": (_table(COLORS), ("What color is {}?", "Name the color of {}.", "Which color does {} have?")),
}
SOURCES = [(family, t) for family, (_, templates) in FAMILIES.items() for t in range(len(templates))]
CORRUPTION_KINDS = ("wrong_answer", "other_instruction", "garbage")


def _make_item(rng: np.random.Generator, family: str, template: int) -> Item:
    make, templates = FAMILIES[family]
    return make(rng, templates[template])


def question_text(instruction: str, inp: str) -> str:
    """How an instruction and its input read as one question (matches the `qa` template)."""
    return f"{instruction}\nInput: {inp}" if inp else instruction


def _corrupt(rng: np.random.Generator, item: Item, kind: str, other: Item) -> str:
    if kind == "wrong_answer":
        return item.distractors[int(rng.integers(len(item.distractors)))]
    if kind == "other_instruction":
        return other.answer if other.answer != item.answer else other.distractors[0]
    letters = "bcdfghjklmnpqrstvwxz"  # garbage: a truncated answer followed by noise
    noise = "".join(letters[i] for i in rng.integers(len(letters), size=int(rng.integers(4, 9))))
    return item.answer[: max(1, len(item.answer) // 2)] + noise


def generate_pool(size: int, corrupt_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """The pool `{id, instruction, input, output}` and its ground truth `{id, family, source, corrupted, kind}`.

    Corruption is planted source by source: a set of "bad" (family, template) sources, drawn
    from the seed, is corrupted at 90%, the rest at 2%, with the bad set sized so the overall
    share is `corrupt_fraction`.
    """
    rng = np.random.default_rng([seed, 1])
    n_sources = len(SOURCES)
    # solve 0.9 b + 0.02 (S - b) = f S for the number b of bad sources
    n_bad = int(round((corrupt_fraction - 0.02) * n_sources / 0.88)) if corrupt_fraction > 0 else 0
    bad = set(rng.choice(n_sources, size=min(max(n_bad, 0), n_sources), replace=False).tolist())
    source_kind = {s: CORRUPTION_KINDS[j % len(CORRUPTION_KINDS)] for j, s in enumerate(sorted(bad))}
    records, truth, seen = [], [], set()
    attempts = 0
    while len(records) < size:
        attempts += 1
        if attempts > 50 * size:
            raise RuntimeError("could not generate enough distinct records; lower prepare.embedded.pool_size")
        s = int(rng.integers(n_sources))
        family, template = SOURCES[s]
        item = _make_item(rng, family, template)
        rate = 0.9 if s in bad else (0.02 if corrupt_fraction > 0 else 0.0)
        corrupted = bool(rng.random() < rate)
        kind = source_kind.get(s, CORRUPTION_KINDS[int(rng.integers(3))]) if corrupted else ""
        other_family = list(FAMILIES)[int(rng.integers(len(FAMILIES)))]
        output = _corrupt(rng, item, kind, _make_item(rng, other_family, 0)) if corrupted else item.answer
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
        choices = [item.answer, *item.distractors]
        order = rng.permutation(len(choices))
        choices = [choices[i] for i in order]
        qid = record_id(question, *choices)
        if qid in seen:
            continue
        seen.add(qid)
        out.append({"id": qid, "question": question, "choices": choices, "answer": int(np.argmax(order == 0))})
    return out


def pretraining_corpus(n_lines: int, seed: int) -> list[str]:
    """Generic text for briefly pre-training the tiny base: word lists and plain statements of facts.

    It teaches the vocabulary and the facts, never the question-answer format, so instruction
    tuning still has something to teach (and something for harmful records to break).
    """
    rng = np.random.default_rng([seed, 7])
    lines = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.4:
            lines.append(" ".join(_word_list(rng, int(rng.integers(3, 9)))) + ".")
        elif r < 0.6:
            country = sorted(CAPITALS)[int(rng.integers(len(CAPITALS)))]
            lines.append(f"{CAPITALS[country]} is the capital of {country}.")
        elif r < 0.8:
            word = sorted(OPPOSITES)[int(rng.integers(len(OPPOSITES)))]
            lines.append(f"{word} and {OPPOSITES[word]} are opposites.")
        else:
            thing = sorted(COLORS)[int(rng.integers(len(COLORS)))]
            lines.append(f"{thing} is {COLORS[thing]}.")
    return lines
