"""Chunked readers, so that no stage holds a large file twice: JSON Lines and Parquet, a chunk of rows
at a time (the prepare stage streams pools with them, embed reads data/prepared/pool.jsonl).

The pool readers give each chunk with its rows' 1-based places in the file (JSONL lines, Parquet rows), so
that errors can name them; a bad line raises fileio.read_jsonl's one-line error for it.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterator
from pathlib import Path

from shed.fileio import ShedError, jsonl_row, read_jsonl

log = logging.getLogger(__name__)

CHUNK = 10_000


def iter_jsonl(path: str | Path, chunk_size: int = CHUNK) -> Iterator[tuple[list[int], list[dict]]]:
    """JSON objects of a JSONL file, `chunk_size` at a time, as (line numbers, rows); errors as fileio.read_jsonl's."""
    path = Path(path)
    if not path.is_file():
        read_jsonl(path)  # raises: not found / a directory
    chunk: list[dict] = []
    lines: list[int] = []
    offset = 0  # of this line in the file, for the not-UTF-8 message
    with path.open("rb") as fh:
        # Binary lines end at b"\n" only, as read_jsonl's records do (not at U+2028, U+0085, ...).
        for lineno, raw in enumerate(fh, start=1):
            line = _decode(raw, path, lineno, offset)
            offset += len(raw)
            row = jsonl_row(path, lineno, line)
            if row is None:
                continue
            chunk.append(row)
            lines.append(lineno)
            if len(chunk) == chunk_size:
                yield lines, chunk
                chunk, lines = [], []
    if chunk:
        yield lines, chunk


def _decode(raw: bytes, path: Path, lineno: int, offset: int) -> str:
    """Line `lineno` as read_jsonl sees it: decoded (a BOM dropped from the file's start), without its line end."""
    bom = len(codecs.BOM_UTF8) if lineno == 1 and raw.startswith(codecs.BOM_UTF8) else 0
    try:
        line = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        raise ShedError(f"{path}: line {lineno}: not UTF-8 (byte 0x{raw[at]:02x} at offset {offset + at})") from None
    return line[:-1] if line.endswith("\n") else line


def iter_parquet(path: str | Path, chunk_size: int = CHUNK) -> Iterator[tuple[range, list[dict]]]:
    """Rows of a Parquet file, one record batch of at most `chunk_size` rows at a time, as (row numbers, rows)."""
    import pyarrow.parquet as pq

    start = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_size):
            rows = batch.to_pylist()
            yield range(start + 1, start + len(rows) + 1), rows
            start += len(rows)
    except Exception as exc:  # pyarrow raises several types for corrupt files (the same ones as read_table)
        raise ShedError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None


def jsonl_chunks(path: str | Path, chunk_size: int = CHUNK) -> Iterator[list[dict]]:
    """A prepared JSONL file (e.g. data/prepared/pool.jsonl) in chunks of rows."""
    return (rows for _, rows in iter_jsonl(path, chunk_size))


def peak_rss_mb() -> int:
    """This process's peak resident memory in MB: VmHWM of its own address space where Linux reports it
    (ru_maxrss also counts the parent's memory at fork), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def count_lines(path: str | Path) -> int:
    """Non-blank lines of a JSONL file (its records), without parsing them."""
    count = 0
    with Path(path).open("rb") as fh:
        for line in fh:
            count += bool(line.strip())
    return count
