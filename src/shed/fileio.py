"""File I/O at the stage edges: atomic writes, JSONL, and the one error type users see.

Every output is written to a temporary sibling and renamed into place, so a crash or a bad
record never leaves a half-written file where DVC (or the next stage) would pick it up.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ShedError(Exception):
    """A user-facing error: printed as one line (file, record, field, what is wrong), exit 1."""


DISTRIBUTION = "shed-curate"  # shed on a package index, as pyproject.toml names it (`shed` there is a code formatter)


def install_hint(extra: str) -> str:
    """How to add an optional extra of shed: in a checkout, or from a package index."""
    return f"pip install -e '.[{extra}]' in a checkout, or pip install '{DISTRIBUTION}[{extra}]'"


def json_line(obj: Any) -> str:
    # Sorted keys and no ASCII escaping: byte-identical output for identical content.
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _as_text(value: Any) -> str:
    # What JSON cannot hold (a Parquet or hub timestamp, date, decimal, bytes): ISO 8601 for dates, else str().
    iso = getattr(value, "isoformat", None)
    return iso() if callable(iso) else str(value)


def row_line(row: Any) -> str:
    """A user's row as one JSON line: its fields in their own order, no ASCII escaping, and any value JSON cannot
    hold as text (ISO 8601 for dates and times, str() otherwise)."""
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=_as_text)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it over `path` only if the block succeeds.

    Works for files and directories alike (whatever the block creates at the temporary path). A
    file replaces a file in one rename; anything involving a directory moves the old entry aside
    first (two renames), and a block that creates nothing leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: the block wrote nothing at {tmp}")
        if path.exists() and (path.is_dir() or tmp.is_dir()) and not path.is_symlink():
            os.replace(path, tmp.parent / "replaced")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict], line: Callable[[Any], str] = json_line) -> int:
    """Rows as JSON Lines (atomic), each written by `line`: sorted keys (json_line), or as given (row_line)."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(line(row) + "\n")
            count += 1
    return count


def write_csv(path: str | Path, frame: Any) -> None:
    """Write a pandas DataFrame as CSV (atomic, no index, fixed float format for stable bytes)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.8g", lineterminator="\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file; a bad line raises ShedError naming the file and line."""
    path = Path(path)
    rows = []
    # Only "\n" ends a record: str.splitlines() would also split at U+2028, U+0085, ... inside strings.
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        row = jsonl_row(path, lineno, line)
        if row is not None:
            rows.append(row)
    return rows


def jsonl_row(path: str | Path, lineno: int, line: str) -> dict | None:
    """Line `lineno` of a JSONL file as its object (None for a blank line); else ShedError naming file and line."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ShedError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ShedError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ShedError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None


def _read_text(path: Path) -> str:
    if not path.exists():
        raise ShedError(f"{path}: file not found")
    if path.is_dir():
        raise ShedError(f"{path}: is a directory, expected a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # utf-8-sig counts from after the BOM; the offset named is in the file
        at = exc.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        line = data[:at].count(b"\n") + 1
        raise ShedError(f"{path}: line {line}: not UTF-8 (byte 0x{data[at]:02x} at offset {at})") from None


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("SHED_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
