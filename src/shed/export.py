"""`shed export`: the curated dataset in the layouts LLaMA-Factory, axolotl and TRL read.

    shed export --format alpaca                  # -> data/export/curated-alpaca.jsonl (+ dataset_info.json)
    shed export --format sharegpt --out ~/LLaMA-Factory/data    # a folder: the default file name inside it
    # --format alpaca | sharegpt | openai | parquet

Reads the curated records as shed normalised them (data/curated/records.jsonl's ids joined with
data/prepared/pool.jsonl, `artifacts.read_curated`), in selection order, and writes one file:

- alpaca: JSON Lines `{instruction, input, output}`. JSON Lines rather than a JSON array: LLaMA-Factory reads
  both (its data/README.md: json, jsonl, csv, parquet, arrow), so do axolotl and TRL, and it streams.
- sharegpt: JSON Lines `{conversations: [{from: system|human|gpt, value}]}`.
- openai: JSON Lines `{messages: [{role: system|user|assistant, content}]}` (TRL's conversational format).
- parquet: the alpaca columns as a Parquet file.

A single-exchange record's user turn is its instruction, then its input after a blank line (as
train.template chat renders it). A conversation record (`messages`: `[{role, content}]`, roles system, user,
assistant) keeps every turn: sharegpt and openai list them all; alpaca and parquet put the last exchange in
instruction/output, the earlier ones in `history` (`[[user, assistant], ...]`) and a system prompt in `system`,
LLaMA-Factory's alpaca columns (both added to every row once any record needs them). Beside the file,
dataset_info.json gets an entry `shed_curated_<format>` in LLaMA-Factory's schema (file_name, formatting,
columns, tags), other entries kept. data/export/ is not a DVC output (an export is a view of data/curated,
rewritten at will; .gitignore keeps it out of git).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shed import artifacts
from shed.fileio import ShedError, atomic_path, read_json, row_line, write_jsonl, write_text

log = logging.getLogger(__name__)

EXPORT_DIR = "data/export"
FORMATS = {"alpaca": "curated-alpaca.jsonl", "sharegpt": "curated-sharegpt.jsonl",
           "openai": "curated-openai.jsonl", "parquet": "curated-alpaca.parquet"}
DATASET_INFO = "dataset_info.json"
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
CONVERSATION_COLUMNS = {"system": "system", "history": "history"}


def conversation(record: dict) -> list[dict]:
    """A record's turns `[{role, content}]`: its `messages`, or its one exchange (instruction and input as the
    user turn, output as the assistant's)."""
    if record.get("messages"):
        return [{"role": turn["role"], "content": turn["content"]} for turn in record["messages"]]
    user = f"{record['instruction']}\n\n{record['input']}" if record["input"] else record["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def exchanges(record: dict) -> tuple[str, list[tuple[str, str]]]:
    """A conversation record as (system prompt or "", [(user, assistant), ...]); anything else is refused."""
    turns = record["messages"]
    system = turns[0]["content"] if turns[0]["role"] == "system" else ""
    rest = turns[1:] if turns[0]["role"] == "system" else turns
    roles = [t["role"] for t in rest]
    if not rest or roles != ["user", "assistant"] * (len(rest) // 2) or len(rest) % 2:
        raise ShedError(f"{artifacts.POOL}: record {record['id']}: field 'messages': the alpaca layout needs user/"
                        f"assistant exchanges after an optional system turn, got roles {roles}; export it as "
                        "sharegpt or openai")
    return system, [(rest[i]["content"], rest[i + 1]["content"]) for i in range(0, len(rest), 2)]


def alpaca_rows(records: list[dict]) -> tuple[list[dict], bool]:
    """(rows `{instruction, input, output}`, and `system` and `history` in every row once any record is a
    conversation; whether they are)."""
    talks = any(r.get("messages") for r in records)
    rows = []
    for record in records:
        if not record.get("messages"):
            row = {"instruction": record["instruction"], "input": record["input"], "output": record["output"]}
            rows.append({**row, "system": "", "history": []} if talks else row)
            continue
        system, pairs = exchanges(record)
        rows.append({"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1], "system": system,
                     "history": [list(pair) for pair in pairs[:-1]]})
    return rows, talks


def layout(records: list[dict], fmt: str) -> tuple[list[dict], dict]:
    """(the rows of format `fmt`, its LLaMA-Factory dataset_info entry without file_name); pure."""
    if fmt in ("alpaca", "parquet"):
        rows, talks = alpaca_rows(records)
        return rows, {"formatting": "alpaca", "columns": {**ALPACA_COLUMNS, **(CONVERSATION_COLUMNS if talks else {})}}
    if fmt == "sharegpt":
        rows = [{"conversations": [{"from": SHAREGPT_ROLES[t["role"]], "value": t["content"]}
                                   for t in conversation(r)]} for r in records]
        tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "system_tag": "system"}
        return rows, {"formatting": "sharegpt", "columns": {"messages": "conversations"}, "tags": tags}
    if fmt == "openai":
        tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                "system_tag": "system"}
        return [{"messages": conversation(r)} for r in records], {"formatting": "sharegpt",
                                                                   "columns": {"messages": "messages"}, "tags": tags}
    raise ShedError(f"--format: unknown format {fmt!r} (choose {', '.join(FORMATS)})")


def out_path(fmt: str, out: str | None) -> Path:
    """Where format `fmt` goes: `out`, the default file name inside `out` when it is a folder, or data/export/."""
    path = Path(out) if out else Path(EXPORT_DIR) / FORMATS[fmt]
    if path.is_dir():
        path = path / FORMATS[fmt]
    wanted = (".parquet",) if fmt == "parquet" else (".jsonl", ".json")
    if path.suffix.lower() not in wanted:
        raise ShedError(f"--out {path}: the {fmt} layout is written as {' or '.join(wanted)}")
    return path


def write_parquet(path: Path, rows: list[dict], conversations: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [pa.field(name, pa.string()) for name in ("instruction", "input", "output")]
    if conversations:
        fields += [pa.field("system", pa.string()), pa.field("history", pa.list_(pa.list_(pa.string())))]
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), tmp)


def main(fmt: str, out: str | None = None) -> Path:
    """The curated records in format `fmt` -> `out_path(fmt, out)`, and its entry in dataset_info.json beside it;
    returns the path."""
    path = out_path(fmt, out)
    records = artifacts.read_curated()
    if not records:
        raise ShedError(f"{artifacts.CURATED_RECORDS}: the curated dataset is empty")
    rows, entry = layout(records, fmt)
    info_path = path.parent / DATASET_INFO
    info = read_json(info_path) if info_path.is_file() else {}  # read (and judged) before anything is written
    if not isinstance(info, dict):
        raise ShedError(f"{info_path}: expected a JSON object of dataset entries, got {type(info).__name__}")
    name = f"shed_curated_{fmt}"
    info[name] = {"file_name": path.name, **entry}
    if fmt == "parquet":
        write_parquet(path, rows, "history" in entry["columns"])
    else:
        write_jsonl(path, rows, line=row_line)
    write_text(info_path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    log.info("exported %d curated records (%s) -> %s; LLaMA-Factory: entry %r in %s", len(rows), fmt, path, name,
             info_path)
    return path
