"""Real multiple-choice benchmarks read in place: the original MMLU CSV layout and AI2 ARC JSONL.

MMLU: one headerless CSV per subject and split, `question,A,B,C,D,answer` (`<dir>/test/<subject>_test.csv`).
ARC: one JSON object per line, `{id, question: {stem, choices: [{text, label}]}, answerKey}`; labels
may be A-E or 1-5. Rows come out in the schema of lm-eval's built-in tasks (hub `cais/mmlu`,
`allenai/ai2_arc`), so the project's offline tasks use those tasks' prompts unchanged. Every
malformed row raises ShedError naming the file, the position (1-based: "row N" in a CSV, which has no
header here; "line N" in JSONL) and the field.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from shed.data import Rows, jsonl_line_numbers, load_rows, normalize_choice_set
from shed.fileio import ShedError, _read_text, read_jsonl

MMLU_LETTERS = ("A", "B", "C", "D")


def mmlu_files(directory: str | Path, split: str = "test") -> list[Path]:
    """`<dir>/<split>/*_<split>.csv`, or the CSVs directly in `dir`; sorted (subject order)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShedError(f"{directory}: MMLU directory not found")
    files = sorted((directory / split).glob(f"*_{split}.csv")) or sorted(directory.glob("*.csv"))
    if not files:
        raise ShedError(f"{directory}: no MMLU CSV files (expected {split}/<subject>_{split}.csv)")
    return files


def mmlu_subject(path: Path) -> str:
    return re.sub(r"_(test|dev|val)$", "", path.stem)


def read_mmlu_csv(path: Path) -> list[dict]:
    """One subject's rows as `{subject, question, choices, answer}` (answer: 0-3)."""
    text = _read_text(path)
    if not text.strip():
        raise ShedError(f"{path}: empty file")
    rows, subject = [], mmlu_subject(path)
    reader = csv.reader(io.StringIO(text))
    for row, fields in enumerate(reader, start=1):  # rows, not lines: a quoted field may span lines
        if len(fields) != 6:
            raise ShedError(f"{path}: row {row}: expected 6 columns (question,A,B,C,D,answer), got {len(fields)}")
        if fields[5].strip() not in MMLU_LETTERS:
            raise ShedError(f"{path}: row {row}: field 'answer' is {fields[5]!r}, expected one of A, B, C, D")
        if not fields[0].strip():
            raise ShedError(f"{path}: row {row}: field 'question' is empty")
        rows.append({"subject": subject, "question": fields[0], "choices": fields[1:5],
                     "answer": MMLU_LETTERS.index(fields[5].strip())})
    return rows


def mmlu_rows(directory: str | Path, split: str = "test") -> list[dict]:
    return [row for path in mmlu_files(directory, split) for row in read_mmlu_csv(path)]


def arc_rows(path: str | Path) -> list[dict]:
    """AI2 ARC JSONL as `{id, question, choices: {text, label}, answerKey}` (the hub schema)."""
    rows = []
    records = read_jsonl(path)
    for i, (row, line) in enumerate(zip(records, jsonl_line_numbers(path))):
        where = f"{path}: line {line}"
        stem = row.get("question", {}).get("stem") if isinstance(row.get("question"), dict) else None
        if not isinstance(stem, str) or not stem.strip():
            raise ShedError(f"{where}: field 'question.stem' is missing or not a string")
        choices = row["question"].get("choices")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("label"), str)
                           for c in choices)):
            raise ShedError(f"{where}: field 'question.choices' must be a list of at least 2 {{text, label}} strings")
        labels = [c["label"] for c in choices]
        if row.get("answerKey") not in labels:
            raise ShedError(f"{where}: field 'answerKey' is {row.get('answerKey')!r}, not one of the labels {labels}")
        rows.append({"id": str(row.get("id", i)), "question": stem,
                     "choices": {"text": [c["text"] for c in choices], "label": labels}, "answerKey": row["answerKey"]})
    if not rows:
        raise ShedError(f"{path}: empty file (no questions)")
    return rows


def load_choice_set(source: str) -> list[dict]:
    """A dev/eval set `{id, question, choices, answer}` from our JSONL, an ARC JSONL, or MMLU CSV(s)."""
    path = Path(source)
    if path.is_dir() or path.suffix.lower() == ".csv":
        rows = mmlu_rows(path) if path.is_dir() else read_mmlu_csv(path)
        rows = [{k: r[k] for k in ("question", "choices", "answer")} for r in rows]
        return normalize_choice_set(rows if path.is_dir() else Rows(rows, "row"), source)
    return choice_set(load_rows(source), source)  # JSON Lines or a JSON array, whatever the suffix


def choice_set(rows: list[dict], source: str) -> list[dict]:
    """`{id, question, choices, answer}` from rows `load_rows(source)` read: ours, or ARC's (read again
    by `arc_rows`, which knows its layout)."""
    if rows and isinstance(rows[0].get("question"), dict):
        rows = Rows([{"question": r["question"], "choices": r["choices"]["text"],
                      "answer": r["choices"]["label"].index(r["answerKey"])} for r in arc_rows(Path(source))],
                    rows.unit, rows.numbers)
    return normalize_choice_set(rows, source)


def question_key(question: str, choices: list[str]) -> tuple:
    """Identity of a question across files and formats: whitespace- and case-insensitive."""
    norm = lambda s: " ".join(s.split()).casefold()  # noqa: E731
    return (norm(question), tuple(sorted(norm(c) for c in choices)))


def refuse_overlap(dev: list[dict], eval_keys: set[tuple], dev_source: str, eval_source: str) -> None:
    """Never evaluate on questions the Shapley value function saw (a dev set of instruction records has
    no questions to compare: prepare refuses its records that are in the pool instead)."""
    shared = [q for q in dev if "question" in q and question_key(q["question"], q["choices"]) in eval_keys]
    if shared:
        raise ShedError(f"{dev_source}: {len(shared)} dev questions also appear in the eval set {eval_source} "
                        f"(first: record id {shared[0]['id']}); set prepare.dev_exclude to {eval_source} or use another split")
