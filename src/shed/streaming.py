"""Chunked readers, so that no stage holds a large file twice: JSON Lines and Parquet, a chunk of rows
at a time (the prepare stage streams pools with them, embed reads data/prepared/pool.jsonl).

On bad input iter_jsonl raises exactly fileio.read_jsonl's one-line error (it runs it to get it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from shed.fileio import ShedError, read_jsonl

log = logging.getLogger(__name__)

CHUNK = 10_000


def reference_error(run: Callable[[], object], mine: ShedError) -> ShedError:
    """The error the whole-file reference path raises for this input (or ours, if it raises none)."""
    try:
        run()
    except ShedError as exc:
        return exc
    return mine


def iter_jsonl(path: str | Path, chunk_size: int = CHUNK) -> Iterator[list[dict]]:
    """JSON objects of a JSONL file, `chunk_size` at a time; errors exactly as fileio.read_jsonl's."""
    path = Path(path)
    if not path.is_file():
        read_jsonl(path)  # raises: not found / a directory
    chunk: list[dict] = []
    try:
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"line {lineno}: expected a JSON object, got {type(row).__name__}")
                chunk.append(row)
                if len(chunk) == chunk_size:
                    yield chunk
                    chunk = []
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise reference_error(lambda: read_jsonl(path), ShedError(f"{path}: {exc}")) from None
    if chunk:
        yield chunk


def iter_parquet(path: str | Path, chunk_size: int = CHUNK) -> Iterator[list[dict]]:
    """Rows of a Parquet file, one record batch of at most `chunk_size` rows at a time."""
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_size):
            yield batch.to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ShedError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None


def jsonl_chunks(path: str | Path, chunk_size: int = CHUNK) -> Iterator[list[dict]]:
    """A prepared JSONL file (e.g. data/prepared/pool.jsonl) in chunks of rows."""
    return iter_jsonl(path, chunk_size)


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
