"""Instruction pools and multiple-choice sets: loading, schema mapping, validation, stable ids.

A pool record becomes `{id, instruction, input, output}`; `id` is a content hash, so it is the
same on every machine and every run, and nothing downstream is keyed by text. A chat row (ShareGPT
`conversations: [{from, value}]`, OpenAI `messages: [{role, content}]`) of one user turn and its reply
is such a record too; one with more exchanges or a system prompt is kept whole: its record adds
`messages`, every turn as `{role, content}` with roles system/user/assistant, keeps the first exchange
as `instruction`/`output` (`input` "") for code that reads those, and its id hashes every turn.
A multiple-choice record becomes `{id, question, choices, answer}` with `answer` a 0-based index.

Errors name a record as the user finds it in the file, 1-based: "line N" in JSON Lines, "row N" in
CSV (the header is row 1, as a spreadsheet shows it) and Parquet or hub datasets, "item N" in a
JSON array (and in lists built in memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from shed.fileio import ShedError, _read_text, read_json, read_jsonl

log = logging.getLogger(__name__)

POOL_FORMATS = {
    # format -> (instruction, input, output) field names
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
}
CHAT_KEYS = ("conversations", "messages")
# A chat turn's role as written (any case; ShareGPT `from`, OpenAI `role`) -> the role a record keeps.
ROLES = {"system": "system", "user": "user", "human": "user",
         "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class Rows(list):
    """Raw rows that remember where each came from: `where(i)` names row i for the user, 1-based."""

    def __init__(self, rows, unit: str = "item", numbers: Sequence[int] | None = None, header: str | None = None):
        super().__init__(rows)
        self.unit, self.numbers, self.header = unit, numbers, header

    def where(self, i: int) -> str:
        return f"{self.unit} {self.numbers[i] if self.numbers is not None else i + 1}"

    def part(self, start: int, stop: int) -> Rows:
        """Rows start:stop, still named by their positions in the whole."""
        numbers = self.numbers if self.numbers is not None else range(1, len(self) + 1)
        return Rows(self[start:stop], self.unit, numbers[start:stop], self.header)


def where(rows: list, i: int) -> str:
    """Row i's position as the user can find it: "line N", "row N" or "item N" (1-based)."""
    return rows.where(i) if isinstance(rows, Rows) else f"item {i + 1}"


def jsonl_line_numbers(path: str | Path) -> list[int]:
    """The 1-based line number of each record `read_jsonl` returns (it skips blank lines)."""
    return [n for n, line in enumerate(_read_text(Path(path)).split("\n"), start=1) if line.strip()]


def record_id(*parts: str) -> str:
    """A stable 16-hex-digit id from the record's content."""
    blob = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Raw rows from a local file (.json/.jsonl/.csv/.parquet) or a hub dataset `hf:<id>`."""
    if source.startswith("hf:"):
        return _load_hub(source[3:], split)
    path = Path(source)
    if not path.exists():
        raise ShedError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in {".json", ".jsonl"}:
        return _load_json_any(path)
    if suffix == ".csv":
        import pandas as pd

        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        except UnicodeDecodeError:
            raise ShedError(f"{path}: not UTF-8") from None
        except pd.errors.EmptyDataError:
            raise ShedError(f"{path}: empty file") from None
        except pd.errors.ParserError as exc:
            raise ShedError(f"{path}: not valid CSV ({str(exc).strip().splitlines()[-1]})") from None
        # Row numbers as a spreadsheet shows them: the header is row 1.
        return Rows(frame.to_dict(orient="records"), "row", list(range(2, len(frame) + 2)), header="row 1 (the header)")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return Rows(pq.read_table(path).to_pylist(), "row")
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise ShedError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
    raise ShedError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl, .csv or .parquet)")


def _load_json_any(path: Path) -> list[dict]:
    """A JSON array, or JSON Lines, whatever the suffix says (real files mislabel both)."""
    head = path.read_bytes()[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        raise ShedError(f"{path}: empty file")
    if head.startswith(b"["):
        rows = Rows(read_json(path), "item")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ShedError(f"{path}: {rows.where(i)}: expected a JSON object, got {type(row).__name__}")
        return rows
    rows = read_jsonl(path)
    if not rows:
        raise ShedError(f"{path}: empty file")
    return Rows(rows, "line", jsonl_line_numbers(path))


def _load_hub(dataset_id: str, split: str) -> list[dict]:
    import datasets

    log.info("loading hub dataset %s (split %s)", dataset_id, split)
    try:
        return Rows(datasets.load_dataset(dataset_id, split=split), "row")
    except Exception as exc:
        raise ShedError(f"hf:{dataset_id}: could not load split {split!r} from the hub "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "offline, download it first or point prepare.pool at a local file") from None


def detect_format(row: dict, source: str, position: str = "item 1") -> str:
    if any(k in row for k in CHAT_KEYS):
        return "chat"
    if "response" in row and "instruction" in row:
        return "dolly"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise ShedError(f"{source}: {position}: cannot detect the schema from fields {sorted(row)[:8]} "
                    "(expected instruction/input/output, instruction/context/response, or conversations/messages); "
                    "set prepare.format")


def _text(row: dict, key: str, source: str, at: str, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            what = "missing" if key not in row else "null"
            raise ShedError(f"{source}: {at}: field {key!r} is {what}")
        return ""
    if not isinstance(value, str):
        raise ShedError(f"{source}: {at}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _conversation(row: dict, source: str, at: str) -> list[dict]:
    """A chat row's turns as `[{role, content}]` with roles system, user and assistant. Refused (ShedError
    naming the turn): a turn that is not an object, an unknown role, no assistant turn, roles out of order
    (an optional leading system turn, then user and assistant in turn, ending with an assistant reply), an
    empty turn; in a conversation (more than a user turn and its reply) a blank one too, where a single
    exchange with a blank turn goes by prepare.empty as an alpaca row does. A blank system prompt is no
    system prompt: it is left out."""
    key = next(k for k in CHAT_KEYS if k in row)
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise ShedError(f"{source}: {at}: field {key!r} must be a non-empty list of turns")
    messages, written = [], []  # the normalised turns, and each one's role as the file spells it
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ShedError(f"{source}: {at}: field {key}[{t}] must be an object, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or not isinstance(text, str):
            raise ShedError(f"{source}: {at}: field {key}[{t}] needs string role/from and content/value")
        if role.lower() not in ROLES:
            raise ShedError(f"{source}: {at}: field {key}[{t}]: unknown role {role!r} (expected system, "
                            "user/human or assistant/gpt/bot/model)")
        messages.append({"role": ROLES[role.lower()], "content": text})
        written.append(role)
    if not any(m["role"] == "assistant" for m in messages):
        raise ShedError(f"{source}: {at}: field {key!r} has no user turn followed by an assistant turn")
    for t, m in enumerate(messages):
        previous = messages[t - 1]["role"] if t else None
        expected = ("system", "user") if previous is None else ("assistant",) if previous == "user" else ("user",)
        if m["role"] not in expected:
            after = f"after the {previous} turn at {key}[{t - 1}]" if previous else "first"
            wanted = f"{'an' if previous == 'user' else 'a'} {' or '.join(expected)} turn {after}"
            raise ShedError(f"{source}: {at}: field {key}[{t}]: role {written[t]!r} out of order: expected {wanted} "
                            "(an optional system turn, then user and assistant turns in turn)")
    if messages[-1]["role"] != "assistant":
        raise ShedError(f"{source}: {at}: field {key}[{len(messages) - 1}]: the conversation ends with a user turn "
                        "(expected an assistant reply after it)")
    first = 1 if messages[0]["role"] == "system" and not messages[0]["content"].strip() else 0
    conversation = len(messages) - first > 2
    for t in range(first, len(messages)):
        text = messages[t]["content"]
        if not text or (conversation and not text.strip()):
            raise ShedError(f"{source}: {at}: field {key}[{t}]: content is "
                            f"{'empty' if not text else 'blank (only whitespace)'}")
    return messages[first:]


def normalize_row(row: Any, source: str, at: str, fmt: str) -> dict:
    """One raw row of format `fmt` (alpaca, dolly or chat) as a record without its id: `{instruction, input,
    output}`, and for a chat row of more than one exchange or with a system prompt `messages` too (every turn,
    `shed.data._conversation`); a malformed row raises ShedError naming `at`."""
    if not isinstance(row, dict):
        raise ShedError(f"{source}: {at}: expected an object, got {type(row).__name__}")
    if fmt == "chat":
        if not any(k in row for k in CHAT_KEYS):
            raise ShedError(f"{source}: {at}: field 'conversations' or 'messages' is missing")
        messages = _conversation(row, source, at)
        user = next(m["content"] for m in messages if m["role"] == "user")
        record = {"instruction": user, "input": "", "output": next(m["content"] for m in messages
                                                                    if m["role"] == "assistant")}
        if len(messages) > 2:  # more than one exchange, or a system prompt: kept whole
            record["messages"] = messages
        return record
    k_ins, k_inp, k_out = POOL_FORMATS[fmt]
    return {"instruction": _text(row, k_ins, source, at, required=True),
            "input": _text(row, k_inp, source, at, required=False),
            "output": _text(row, k_out, source, at, required=True)}


def content_id(record: dict, *extra: str) -> str:
    """A record's id (`record_id`) from its instruction, input and output, or for a conversation from every
    turn's role and content: two conversations that share a first exchange differ. (A conversation hashes at
    least six parts, a single-turn record three or four, so the two never share an id.) `extra`: more parts
    (prepare.duplicates keep: the record's index in the pool)."""
    if "messages" in record:
        return record_id(*(part for m in record["messages"] for part in (m["role"], m["content"])), *extra)
    return record_id(record["instruction"], record["input"], record["output"], *extra)


class PoolNormalizer:
    """The pool-wide part of normalisation, one row at a time: the format, ids, exact duplicates
    (prepare.duplicates drop|keep|error) and blank records (prepare.empty drop|error)."""

    def __init__(self, source: str, fmt: str = "auto", duplicates: str = "drop", empty: str = "drop"):
        self.source, self.fmt, self.duplicates, self.empty = source, fmt, duplicates, empty
        self.seen: set[str] = set()
        self.index = self.dropped = self.blank = 0

    def add(self, row: dict, at: str, header: str | None = None) -> dict | None:
        """Row `at`'s record `{id, instruction, input, output}` (and `messages` for a conversation), or None
        where it is dropped."""
        source = self.source
        if self.fmt == "auto":
            self.fmt = detect_format(row, source, header or at)
            log.info("%s: prepare.format=auto: detected the %s schema from fields %s (set prepare.format to "
                     "override)", source, self.fmt, sorted(row)[:8])
        i, self.index = self.index, self.index + 1
        record = normalize_row(row, source, at, self.fmt)
        if not record["instruction"].strip() or not record["output"].strip():
            if self.empty == "error":
                field = "instruction" if not record["instruction"].strip() else "output"
                raise ShedError(f"{source}: {at}: field {field!r} is empty (prepare.empty=error)")
            self.blank += 1
            return None
        rid = content_id(record)
        if rid in self.seen:
            if self.duplicates == "error":
                raise ShedError(f"{source}: {at}: exact duplicate of an earlier record (id {rid})")
            if self.duplicates == "drop":
                self.dropped += 1
                return None
            rid = content_id(record, str(i))  # keep: disambiguate by index in the pool
        self.seen.add(rid)
        return {"id": rid, **record}

    def add_rows(self, rows: list) -> list[dict]:
        """The records of a run of rows: a whole pool, or a chunk of one that names its rows' positions (Rows)."""
        return [record for record, _, _ in self.kept(rows)]

    def kept(self, rows: list) -> Iterator[tuple[dict, Any, str]]:
        """Each kept row of a run as (its record, the row as given, its position "line N", "row N" or "item N")."""
        header = getattr(rows, "header", None)
        for i, row in enumerate(rows):
            at = where(rows, i)
            record = self.add(row, at, header)
            if record is not None:
                yield record, row, at

    def finish(self) -> None:
        """Log what was dropped; raise if the pool had no records, or none survived."""
        if not self.index:
            raise ShedError(f"{self.source}: empty pool (no records)")
        if self.dropped:
            log.info("%s: dropped %d exact duplicate records (prepare.duplicates=drop)", self.source, self.dropped)
        if self.blank:
            log.info("%s: dropped %d records with an empty instruction or output (prepare.empty=drop)", self.source,
                     self.blank)
        if not self.seen:
            raise ShedError(f"{self.source}: no usable records (all empty or duplicates)")


def normalize_pool(rows: list[dict], source: str, fmt: str = "auto", duplicates: str = "drop",
                   empty: str = "drop") -> list[dict]:
    """Map raw rows to `{id, instruction, input, output}` (and `messages`: see PoolNormalizer.add); report and
    handle exact duplicates and records whose instruction or output is blank (real Alpaca has a few)."""
    pool = PoolNormalizer(source, fmt, duplicates, empty)
    records = pool.add_rows(rows)
    pool.finish()
    return records


def normalize_choice_set(rows: list[dict], source: str) -> list[dict]:
    """Validate multiple-choice rows `{question, choices, answer}`; `answer` is an index or a letter."""
    if not rows:
        raise ShedError(f"{source}: empty file (no questions)")
    out, seen = [], set()
    for i, row in enumerate(rows):
        at = where(rows, i)
        question = _text(row, "question", source, at, required=True)
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ShedError(f"{source}: {at}: field 'choices' must be a list of at least 2 strings")
        answer = _answer_index(row.get("answer"), len(choices), source, at)
        qid = row.get("id") if isinstance(row.get("id"), str) else record_id(question, *choices)
        if qid in seen:
            continue
        seen.add(qid)
        out.append({"id": qid, "question": question, "choices": choices, "answer": answer})
    return out


def _answer_index(answer: Any, n_choices: int, source: str, at: str) -> int:
    if isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
        answer = ord(answer.upper()) - ord("A")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise ShedError(f"{source}: {at}: field 'answer' must be a choice index or letter, got {answer!r}")
    if not 0 <= answer < n_choices:
        raise ShedError(f"{source}: {at}: field 'answer' is {answer}, out of range for {n_choices} choices")
    return answer
