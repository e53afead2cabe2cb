"""A pool record `{id, instruction, input, output}` as one text: what is embedded and what DSIR compares."""

from __future__ import annotations

FIELDS = ("instruction", "input", "output")


def record_text(record: dict, fields: tuple[str, ...] | list[str] = FIELDS) -> str:
    """The record's non-empty `fields`, in that order, one per line."""
    return "\n".join(record[f] for f in fields if record.get(f))


def question_as_record(question: dict) -> dict:
    """A dev item as a record: a multiple-choice question `{question, choices, answer}` as the record that
    teaches its answer; an instruction record (a dev set of them, prepare.dev) as itself."""
    if "instruction" in question:
        return question
    return {"instruction": question["question"], "input": "", "output": question["choices"][question["answer"]]}
