"""prepare: an instruction pool -> normalized records with stable ids, plus the dev and eval sets.

    shed prepare                       # params.yaml: prepare.*
    # prepare.pool: embedded | data/my_pool.jsonl | hf:tatsu-lab/alpaca

Outputs (data/prepared/): pool.jsonl `{id, instruction, input, output}` (a chat row of more than one
exchange or with a system prompt adds `messages`, every turn: see shed.data), rows.jsonl `{id, source, at, row}`
(line for line with pool.jsonl: each record's row exactly as the user gave it, every field in its own order, and
where it was: `source` is prepare.pool, `at` "line N" (JSONL), "row N" (CSV, header = row 1; Parquet, hub) or
"item N" (JSON array; the embedded pool, whose row is the generated record without its id); a row dropped as a
duplicate or blank has none; values JSON cannot hold, e.g. Parquet timestamps, are written as text), dev.jsonl
and eval.jsonl `{id, question, choices, answer}` (prepare.dev / prepare.eval: our JSONL, an AI2 ARC JSONL, an
MMLU CSV or a directory of them, e.g. ../shared/data/mmlu/val), and for the embedded default
truth.jsonl (which records were planted as harmful: read by benchmarks only, never by the method).

prepare.dev may instead be a file of instruction records in any layout prepare.pool reads (alpaca,
dolly or chat fields; JSONL, a JSON array, CSV with a header, Parquet, hf:<id>): dev.jsonl then holds
records `{id, instruction, input, output}` (and `messages`, as the pool's) with the pool's content-hash
ids, and shapley.value loglik scores their reference responses. The kind is told by the first row's
fields (`question`: multiple choice; `instruction`, `conversations` or `messages`: records). A dev
record that is also in the pool (the same content, so the same id) stops the run.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from shed import artifacts, streaming, synthetic
from shed.config import Params
from shed.data import CHAT_KEYS, POOL_FORMATS, PoolNormalizer, Rows, content_id, load_rows, normalize_row, where
from shed.fileio import ShedError, _read_text
from shed.mcdata import choice_set, load_choice_set, question_key, refuse_overlap

log = logging.getLogger(__name__)


# Streaming a file pool: JSON Lines and Parquet a chunk at a time; other sources (a JSON array, CSV, a hub
# dataset) are loaded whole by shed.data and handed out in chunks. Each chunk is a shed.data.Rows that names
# its rows by their places in the whole file, and one shed.data.PoolNormalizer sees every row in order, so the
# records, ids and one-line errors are normalize_pool(load_rows(...))'s. One difference: in a streamed file
# with several bad things the first in file order is reported, where the whole-file path reports a read error
# (not UTF-8, not JSON) before a bad field on an earlier line. Either way nothing is written.
def iter_rows(source: str, split: str = "train", chunk_size: int = streaming.CHUNK) -> Iterator[Rows]:
    """Raw rows of a pool source in chunks: streamed for JSONL and Parquet, else shed.data.load_rows'."""
    path = Path(source)
    suffix = path.suffix.lower()
    if source.startswith("hf:") or not path.is_file() or suffix not in {".json", ".jsonl", ".parquet"}:
        yield from _chunks(load_rows(source, split), chunk_size)
        return
    if suffix == ".parquet":
        for numbers, rows in streaming.iter_parquet(path, chunk_size):
            yield Rows(rows, "row", numbers)
        return
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head or head.startswith(b"["):  # empty, or a JSON array: shed.data reads (and judges) it whole
        yield from _chunks(load_rows(source, split), chunk_size)
        return
    empty = True
    for lines, rows in streaming.iter_jsonl(path, chunk_size):
        empty = False
        yield Rows(rows, "line", lines)
    if empty:  # only blank lines (e.g. Unicode spaces)
        raise ShedError(f"{path}: empty file")


def _chunks(rows: list, chunk_size: int) -> Iterator[Rows]:
    rows = rows if isinstance(rows, Rows) else Rows(rows)
    for start in range(0, len(rows), chunk_size):
        yield rows.part(start, start + chunk_size)


def origin(record: dict, source: str, at: str, row) -> dict:
    """Where a record came from: `{id, source, at, row}`, the row as the user gave it (rows.jsonl)."""
    return {"id": record["id"], "source": source, "at": at, "row": row}


def pool_rows(source: str, split: str = "train", fmt: str = "auto", duplicates: str = "drop", empty: str = "drop",
              chunk_size: int = 0) -> Iterator[tuple[dict, dict]]:
    """(record, origin) of each kept row of a pool source, read in chunks: the records and errors of
    normalize_pool(load_rows(source)), each with its row as given and its place (`origin`)."""
    pool = PoolNormalizer(source, fmt, duplicates, empty)
    for rows in iter_rows(source, split, chunk_size or streaming.CHUNK):
        for record, row, at in pool.kept(rows):
            yield record, origin(record, source, at, row)
    pool.finish()


def pool_records(source: str, split: str = "train", fmt: str = "auto", duplicates: str = "drop", empty: str = "drop",
                 chunk_size: int = 0) -> Iterator[dict]:
    """Normalised records `{id, instruction, input, output}` (and `messages`) of a pool source, read in chunks:
    the same records and errors as normalize_pool(load_rows(source))."""
    return (record for record, _ in pool_rows(source, split, fmt, duplicates, empty, chunk_size))


def exclude(dev: list[dict], sources: list[str]) -> list[dict]:
    """The dev set without any question that appears in `sources` (the files the evaluate stage uses)."""
    keys = {question_key(q["question"], q["choices"]) for source in sources for q in load_choice_set(source)}
    kept = [q for q in dev if question_key(q["question"], q["choices"]) not in keys]
    log.info("prepare.dev_exclude: dropped %d dev questions found in %s", len(dev) - len(kept), ", ".join(sources))
    if not kept:
        raise ShedError(f"prepare.dev_exclude: no dev question left after removing those in {', '.join(sources)}")
    return kept


def _record_format(row) -> str | None:
    """The pool schema (chat, dolly, alpaca: as data.detect_format tells them) of a dev set's first row,
    or None for a multiple-choice question (or anything else: the question reader then says what is wrong)."""
    if not isinstance(row, dict) or "question" in row:
        return None
    if any(k in row for k in CHAT_KEYS):
        return "chat"
    if "instruction" in row:
        return "dolly" if "response" in row else "alpaca"
    return None


def load_dev(source: str) -> tuple[list[dict], dict[str, str]]:
    """prepare.dev's items and, for instruction records, where each is in the file (id -> "line N").

    Multiple-choice questions `{id, question, choices, answer}` (our JSONL, ARC JSONL, an MMLU CSV or a
    folder of them): the positions are {}. Instruction records in any layout prepare.pool reads become
    `{id, instruction, input, output}` (a conversation with `messages`) with the pool's ids (`data.content_id`);
    a blank instruction or output is an error (nothing to score), an exact duplicate counts once. The first row's
    fields tell the kind; a CSV's header (MMLU's CSVs have none: their first row is a question)."""
    path = Path(source)
    if path.is_dir():
        return load_choice_set(source), {}
    if path.suffix.lower() == ".csv":
        header = next(csv.reader(_read_text(path).splitlines()[:1]), []) if path.is_file() else []
        fmt = _record_format({name.strip(): "" for name in header})
        if fmt is None:
            return load_choice_set(source), {}
        rows = load_rows(source)
    else:
        rows = load_rows(source)
        fmt = _record_format(rows[0]) if rows else None
        if fmt is None:
            return choice_set(rows, source), {}
    if not rows:
        raise ShedError(f"{source}: empty file (no records)")
    names = POOL_FORMATS.get(fmt, ("instruction", "input", "output"))
    records, positions = [], {}
    for i, row in enumerate(rows):
        at = where(rows, i)
        record = normalize_row(row, source, at, fmt)
        for name, text in ((names[0], record["instruction"]), (names[2], record["output"])):
            if not text.strip():
                raise ShedError(f"{source}: {at}: field {name!r} is empty (a dev record needs an instruction and "
                                "a reference response)")
        rid = content_id(record)
        if rid not in positions:  # an exact duplicate counts once
            records.append({"id": rid, **record})
            positions[rid] = at
    log.info("%s: %d instruction records (%s fields) as the dev set", source, len(records), fmt)
    return records, positions


def refuse_dev_in_pool(pool: Iterable[tuple[dict, dict]], positions: dict[str, str], dev_source: str,
                       pool_source: str) -> Iterator[tuple[dict, dict]]:
    """The pool's (record, origin) pairs, passed on as they are read; once all are read, an error if any record
    is a dev record (a record must not value itself), naming the first in dev-file order."""
    found = set()
    for record, row in pool:
        if record["id"] in positions:
            found.add(record["id"])
        yield record, row
    if found:
        first_id = next(rid for rid in positions if rid in found)
        raise ShedError(f"{dev_source}: {positions[first_id]}: dev record {first_id} is also in the pool {pool_source} "
                        f"(dev records in the pool: {len(found)} of {len(positions)}); a record must not value itself: "
                        "remove them from the dev set or the pool")


class Counted:
    """An iterable of rows that counts what it hands out (a streamed pool has no len() until written)."""

    def __init__(self, rows: Iterable):
        self.rows, self.count = rows, 0

    def __iter__(self) -> Iterator:
        for row in self.rows:
            self.count += 1
            yield row

    def __len__(self) -> int:
        return self.count


def first(records: Iterable, n: int) -> Iterator:
    """The first n records; the rest are still read (and so still checked), as before streaming."""
    for i, record in enumerate(records):
        if i < n:
            yield record


def build(params: Params, stream: bool = False) -> dict[str, list]:
    """All prepared tables (nothing written); the pool as (record, origin) pairs (`pool_rows`): in memory, or
    with `stream` a file pool as a one-pass iterable read in chunks (prepare.pool JSONL/Parquet), consumed when
    written."""
    cfg = params.prepare
    emb = cfg.embedded
    tables: dict[str, list] = {"pool": []}  # pool first: the order files and metrics list the tables in
    if cfg.pool == "embedded":
        generated, tables["truth"] = synthetic.generate_pool(emb.pool_size, emb.corrupt_fraction, emb.seed)
        kept = [(r, origin(r, "embedded", f"item {i + 1}", {k: v for k, v in r.items() if k != "id"}))
                for i, r in enumerate(generated[: cfg.max_records or None])]
    else:
        kept = pool_rows(cfg.pool, cfg.split, cfg.format, cfg.duplicates, cfg.empty)
        if cfg.max_records:
            kept = first(kept, cfg.max_records)
    tables["dev"], positions = (synthetic.generate_questions(emb.dev_size, emb.seed, salt=11), {}) \
        if cfg.dev == "embedded" else load_dev(cfg.dev)
    if positions:  # instruction records: none may be a pool record (checked as the pool is read)
        if cfg.dev_exclude:
            raise ShedError(f"params.yaml: prepare.dev_exclude: removes multiple-choice questions, and prepare.dev "
                            f"{cfg.dev} holds instruction records: set it to []")
        kept = refuse_dev_in_pool(kept, positions, cfg.dev, cfg.pool)
    tables["pool"] = Counted(kept) if stream and cfg.pool != "embedded" else list(kept)  # type: ignore[assignment]
    tables["eval"] = (synthetic.generate_questions(emb.eval_size, emb.seed, salt=12) if cfg.eval == "embedded"
                      else load_choice_set(cfg.eval))
    if cfg.dev_exclude:
        tables["dev"] = exclude(tables["dev"], cfg.dev_exclude)
    # Never evaluate on questions the value function saw: refused for given files, dropped for generated ones.
    if not positions and (cfg.dev != "embedded" or cfg.eval != "embedded"):
        refuse_overlap(tables["dev"], {question_key(q["question"], q["choices"]) for q in tables["eval"]},
                       cfg.dev, cfg.eval)
    dev_ids = {q["id"] for q in tables["dev"]}
    overlap = sum(q["id"] in dev_ids for q in tables["eval"])
    if overlap:
        log.info("removing %d eval questions that also appear in the dev set", overlap)
        tables["eval"] = [q for q in tables["eval"] if q["id"] not in dev_ids]
    if not tables["eval"]:
        raise ShedError(f"{cfg.eval}: no eval question left after removing those in the dev set")
    return tables


def main(params: Params) -> None:
    tables = build(params, stream=True)
    artifacts.write_prepared(tables)  # a streamed pool is read, checked and written here, chunk by chunk
    counts = {name: len(rows) for name, rows in tables.items() if name != "truth"}
    if "truth" in tables:
        counts["planted_harmful"] = sum(r["corrupted"] for r in tables["truth"])
    counts["peak_rss_mb"] = streaming.peak_rss_mb()
    artifacts.write_metrics("prepare", counts)
    log.info("prepared %s -> %s/", ", ".join(f"{v} {k}" for k, v in counts.items()), artifacts.PREPARED)
