"""A pool record `{id, instruction, input, output}` (or a conversation, with `messages`) as one text: what is
embedded and what DSIR compares; and its responses, what the length baseline measures."""

from __future__ import annotations

FIELDS = ("instruction", "input", "output")
# A conversation's turns each field stands for: the instruction is what the user side says (system prompt and
# user turns), the output what the assistant says; a conversation has no input.
FIELD_ROLES = {"instruction": ("system", "user"), "input": (), "output": ("assistant",)}


def record_text(record: dict, fields: tuple[str, ...] | list[str] = FIELDS) -> str:
    """The record's non-empty `fields`, in that order, one per line; for a conversation the content of every
    turn whose role the fields select (FIELD_ROLES), in the conversation's order, one per line."""
    if "messages" in record:
        roles = {role for f in fields for role in FIELD_ROLES[f]}
        return "\n".join(m["content"] for m in record["messages"] if m["role"] in roles and m["content"])
    return "\n".join(record[f] for f in fields if record.get(f))


def responses(record: dict) -> list[str]:
    """The record's responses: its output, or a conversation's every assistant reply."""
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return [record["output"]]


def question_as_record(question: dict) -> dict:
    """A dev item as a record: a multiple-choice question `{question, choices, answer}` as the record that
    teaches its answer; an instruction record (a dev set of them, prepare.dev) as itself."""
    if "instruction" in question:
        return question
    return {"instruction": question["question"], "input": "", "output": question["choices"][question["answer"]]}
